//! Compiles the vendored CNPG-I protos (proto/, see proto/README.md) with
//! protox, so that no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["backup", "identity", "metrics", "operator", "operator_lifecycle", "postgres", "reconciler", "restore_job", "wal"]
        .map(|f| format!("proto/{f}.proto"));
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(&files, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
