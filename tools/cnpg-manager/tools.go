//go:build tools

// Package tools pins CloudNativePG's instance manager (the program that is
// /controller/manager in CloudNativePG's pods) for the tests: its
// `wal-archive` and `wal-restore` commands call pgkeep's plugin socket as
// they do in a pod. Test tooling only; nothing pgkeep ships is Go.
package tools

import _ "github.com/cloudnative-pg/cloudnative-pg/cmd/manager"
