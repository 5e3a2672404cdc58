//! Compiles the BPF programs in `bpf/` with clang. BPF is C here: the Rust
//! toolchain on the build machines has no `rust-src` for a BPF target.

use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["capture"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    // asm/types.h lives under the multiarch include directory (pitfall 6).
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "x86_64-linux-gnu".to_string());
    for name in PROGRAMS {
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
            .arg(format!("-I/usr/include/{multiarch}"))
            .args(["-c", &src, "-o"])
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!(
                "clang failed ({s}) compiling {src}. The BPF headers come from Debian's \
                 libbpf-dev and linux-libc-dev: apt-get install -y clang llvm libbpf-dev \
                 (scripts/test.sh and scripts/demo.sh install them)"
            ),
            Err(e) => panic!(
                "cannot run {clang} ({e}) to compile {src}: install clang, llvm and libbpf-dev \
                 (apt-get install -y clang llvm libbpf-dev; scripts/test.sh and scripts/demo.sh \
                 install them), or point CLANG at a clang binary"
            ),
        }
    }
}
