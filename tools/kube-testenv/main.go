// Command kube-testenv runs a real Kubernetes control plane on loopback for
// pgkeep's tests: etcd, kube-apiserver (RBAC and the default admission
// plugins on) and kube-controller-manager (so StatefulSets, Jobs and the
// garbage collector work), all built from the Go modules Kubernetes
// publishes. No kubelet and no scheduler run: Pods never start by
// themselves, the tests play the kubelet.
//
//	kube-testenv start DIR    start everything in the background, wait until
//	                          it answers, write DIR/kubeconfig (admin), exit
//	kube-testenv stop DIR     stop what start started (SIGTERM, then SIGKILL)
//	kube-testenv kubectl ...  the kubectl of the same release (also when the
//	                          binary is invoked under the name "kubectl")
//
// "kubectl create token SA -n NS" mints a ServiceAccount token.
//
// The internal subcommands etcd, apiserver and controller-manager are the
// three processes start spawns (one process each, as in a real cluster:
// their global flags and metrics registries cannot share one process).
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

// The processes start runs, in order.
var parts = []string{"etcd", "apiserver", "controller-manager"}

func main() {
	if filepath.Base(os.Args[0]) == "kubectl" {
		os.Exit(runKubectl(os.Args[1:]))
	}
	if len(os.Args) < 2 {
		usage()
	}
	cmd, args := os.Args[1], os.Args[2:]
	if cmd == "kubectl" {
		os.Exit(runKubectl(args))
	}
	if len(args) != 1 {
		usage()
	}
	dir, err := filepath.Abs(args[0])
	if err != nil {
		fail(err)
	}
	switch cmd {
	case "start":
		err = start(dir)
	case "stop":
		err = stop(dir)
	case "etcd":
		err = runEtcd(dir)
	case "apiserver":
		os.Exit(runAPIServer(dir))
	case "controller-manager":
		os.Exit(runControllerManager(dir))
	default:
		usage()
	}
	if err != nil {
		fail(err)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: kube-testenv start DIR | stop DIR | kubectl ARGS...")
	os.Exit(2)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kube-testenv:", err)
	os.Exit(1)
}

func runKubectl(args []string) int {
	command := kubectlcmd.NewDefaultKubectlCommand()
	command.SetArgs(args)
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err)
		return 1
	}
	return 0
}

// --- start and stop ---

// ports are chosen by start and read back by the children.
type ports struct{ etcdClient, etcdPeer, apiserver, kcm int }

func (p ports) String() string {
	return fmt.Sprintf("%d %d %d %d", p.etcdClient, p.etcdPeer, p.apiserver, p.kcm)
}

func readPorts(dir string) (ports, error) {
	b, err := os.ReadFile(filepath.Join(dir, "ports"))
	if err != nil {
		return ports{}, err
	}
	var p ports
	_, err = fmt.Sscanf(string(b), "%d %d %d %d", &p.etcdClient, &p.etcdPeer, &p.apiserver, &p.kcm)
	return p, err
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func start(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, "apiserver.pid")); err == nil {
		if alive(dir, "apiserver") {
			return fmt.Errorf("a control plane already runs in %s: stop it first", dir)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	var p ports
	for _, q := range []*int{&p.etcdClient, &p.etcdPeer, &p.apiserver, &p.kcm} {
		port, err := freePort()
		if err != nil {
			return err
		}
		*q = port
	}
	if err := os.WriteFile(filepath.Join(dir, "ports"), []byte(p.String()), 0o600); err != nil {
		return err
	}
	token, err := writeCredentials(dir)
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		return err
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", p.apiserver)
	kubeconfig := kubeconfigYAML(server, caPEM, "admin", token)
	// The controller-manager's kubeconfig is written first; the test's one
	// only once the control plane answers, so its existence means ready.
	if err := os.WriteFile(filepath.Join(dir, "admin.kubeconfig"), []byte(kubeconfig), 0o600); err != nil {
		return err
	}
	os.Remove(filepath.Join(dir, "kubeconfig"))

	self, err := os.Executable()
	if err != nil {
		return err
	}
	for _, part := range parts {
		if err := spawn(self, dir, part); err != nil {
			stop(dir)
			return err
		}
		var ready func() error
		switch part {
		case "etcd":
			ready = func() error { return httpOK(fmt.Sprintf("http://127.0.0.1:%d/health", p.etcdClient), nil, "") }
		case "apiserver":
			ready = func() error { return httpOK(server+"/readyz", caPEM, token) }
		case "controller-manager":
			// The ServiceAccount controller makes "default" in every
			// namespace; Pods cannot be created before it exists.
			ready = func() error {
				return httpOK(server+"/api/v1/namespaces/default/serviceaccounts/default", caPEM, token)
			}
		}
		if err := waitFor(dir, part, ready); err != nil {
			stop(dir)
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "kubeconfig"), []byte(kubeconfig), 0o600); err != nil {
		return err
	}
	fmt.Printf("control plane up: %s (KUBECONFIG=%s)\n", server, filepath.Join(dir, "kubeconfig"))
	return nil
}

func spawn(self, dir, part string) error {
	log, err := os.OpenFile(filepath.Join(dir, part+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	cmd := exec.Command(self, part, dir)
	cmd.Stdout = log
	cmd.Stderr = log
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, part+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600); err != nil {
		return err
	}
	// Reap it if it dies while start still runs, so alive() sees it gone.
	go cmd.Wait()
	return nil
}

func waitFor(dir, part string, ready func() error) error {
	deadline := time.Now().Add(180 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		if !alive(dir, part) {
			return fmt.Errorf("%s exited while starting: %s", part, tail(filepath.Join(dir, part+".log")))
		}
		if last = ready(); last == nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after 180 s (%v): %s", part, last, tail(filepath.Join(dir, part+".log")))
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 15 {
		lines = lines[len(lines)-15:]
	}
	return "last lines of " + path + ":\n" + strings.Join(lines, "\n")
}

func pidOf(dir, part string) int {
	b, err := os.ReadFile(filepath.Join(dir, part+".pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

func alive(dir, part string) bool {
	pid := pidOf(dir, part)
	if pid <= 0 {
		return false
	}
	// A zombie still answers signal 0; look at its state too.
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	fields := strings.Fields(string(stat))
	return len(fields) > 2 && fields[2] != "Z"
}

func stop(dir string) error {
	for i := len(parts) - 1; i >= 0; i-- {
		part := parts[i]
		pid := pidOf(dir, part)
		if pid <= 0 {
			continue
		}
		if alive(dir, part) {
			syscall.Kill(pid, syscall.SIGTERM)
			deadline := time.Now().Add(15 * time.Second)
			for alive(dir, part) && time.Now().Before(deadline) {
				time.Sleep(100 * time.Millisecond)
			}
			if alive(dir, part) {
				syscall.Kill(pid, syscall.SIGKILL)
				time.Sleep(200 * time.Millisecond)
			}
		}
		os.Remove(filepath.Join(dir, part+".pid"))
	}
	os.Remove(filepath.Join(dir, "kubeconfig"))
	return nil
}

func httpOK(u string, caPEM []byte, token string) error {
	tr := &http.Transport{}
	if caPEM != nil {
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(caPEM)
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	req, err := http.NewRequest("GET", u, nil)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("%s answered %s", u, resp.Status)
	}
	return nil
}

// --- credentials ---

// writeCredentials makes a CA, the API server's serving certificate, the
// ServiceAccount signing key and the admin token, and returns the token.
func writeCredentials(dir string) (string, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kube-testenv CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return "", err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		return "", err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return "", err
	}
	files := map[string][]byte{
		"ca.crt":     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		"server.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}),
		"server.key": pemKey(srvKey),
		"sa.key":     pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return "", err
	}
	files["sa.pub"] = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub})
	raw := make([]byte, 24)
	if _, err := rand.Read(raw); err != nil {
		return "", err
	}
	token := hex.EncodeToString(raw)
	files["tokens.csv"] = []byte(token + ",admin,admin-uid,system:masters\n")
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			return "", err
		}
	}
	return token, nil
}

func pemKey(k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		panic(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
}

func kubeconfigYAML(server string, caPEM []byte, user, token string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kube-testenv
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    token: %s
contexts:
- name: kube-testenv
  context:
    cluster: kube-testenv
    user: %s
    namespace: default
current-context: kube-testenv
`, server, base64.StdEncoding.EncodeToString(caPEM), user, token, user)
}

// --- the three processes ---

func runEtcd(dir string) error {
	p, err := readPorts(dir)
	if err != nil {
		return err
	}
	cfg := embed.NewConfig()
	cfg.Dir = filepath.Join(dir, "etcd")
	client, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", p.etcdClient))
	peer, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", p.etcdPeer))
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	// A throwaway store for tests: no fsync (a machine crash loses it anyway).
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return errors.New("etcd not ready after 60 s")
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	select {
	case <-ctx.Done():
		return nil
	case err := <-e.Err():
		return err
	}
}

func runAPIServer(dir string) int {
	p, err := readPorts(dir)
	if err != nil {
		fail(err)
	}
	f := func(name string) string { return filepath.Join(dir, name) }
	cmd := apiserverapp.NewAPIServerCommand()
	cmd.SetArgs([]string{
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", p.etcdClient),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", p.apiserver),
		"--cert-dir=" + f("certs"),
		"--tls-cert-file=" + f("server.crt"),
		"--tls-private-key-file=" + f("server.key"),
		"--client-ca-file=" + f("ca.crt"),
		"--token-auth-file=" + f("tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + f("sa.pub"),
		"--service-account-signing-key-file=" + f("sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--allow-privileged=true",
		"--endpoint-reconciler-type=none",
		"--v=1",
	})
	return cli.Run(cmd)
}

func runControllerManager(dir string) int {
	p, err := readPorts(dir)
	if err != nil {
		fail(err)
	}
	f := func(name string) string { return filepath.Join(dir, name) }
	cmd := kcmapp.NewControllerManagerCommand()
	cmd.SetArgs([]string{
		"--kubeconfig=" + f("admin.kubeconfig"),
		"--authentication-kubeconfig=" + f("admin.kubeconfig"),
		"--authorization-kubeconfig=" + f("admin.kubeconfig"),
		"--bind-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", p.kcm),
		"--cert-dir=" + f("kcm-certs"),
		"--leader-elect=false",
		"--root-ca-file=" + f("ca.crt"),
		"--service-account-private-key-file=" + f("sa.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--v=1",
	})
	return cli.Run(cmd)
}
