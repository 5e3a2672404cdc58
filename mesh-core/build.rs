//! Compiles the protobuf definitions under `proto/` (xDS transport, Istio's
//! workload/authorization/CA types, Ambit's extensions and L7 types) with
//! protoc.

fn main() {
    // Read at run time, not baked in with env!(): a build-script binary
    // reused from another checkout of the same sources must not point there.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let root = std::path::Path::new(&manifest_dir).join("../proto");
    let files = [
        "envoy/discovery.proto",
        "istio/workload.proto",
        "istio/authorization.proto",
        "istio/ca.proto",
        "ambit/extensions.proto",
        "ambit/route.proto",
    ]
    .map(|f| root.join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    if let Err(e) =
        tonic_prost_build::configure().compile_protos(&files, std::slice::from_ref(&root))
    {
        panic!(
            "compiling {}: {e}\nprotoc and the well-known types come from the Debian packages \
             protobuf-compiler and libprotobuf-dev (scripts/setup.sh installs them)",
            root.display()
        );
    }
}
