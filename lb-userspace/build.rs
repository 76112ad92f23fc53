//! Builds the eBPF object from `lb-ebpf` and hands its path to the agent, which embeds it
//! with `include_bytes!`: the agent always carries the datapath it was built with.
//!
//! Toolchains, in order of preference (see ../shared/reference/toolchain.md and docs/build.md):
//! 1. `XLB_EBPF_RUSTC` if set (a rustc with `core` for bpfel-unknown-none);
//! 2. rustup nightly with rust-src (`-Z build-std=core`), the upstream aya path;
//! 3. Debian's `/usr/bin/rustc` (package rustc-web) with libstd-rust-web-dev-bpf.
//!
//! `cargo xtask setup` installs (3) and bpf-linker when neither is present.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for p in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=XLB_EBPF_RUSTC");

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(&cargo);
    // Do not leak the host build's settings into the BPF build (clippy's wrapper, host
    // rustflags, the host rustc, a forced target).
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTDOC",
        "RUSTC_LINKER",
    ] {
        cmd.env_remove(var);
    }
    for (k, _) in env::vars() {
        if k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_CFG_")
            || k.starts_with("CARGO_PROFILE_")
        {
            cmd.env_remove(k);
        }
    }
    // bpf-linker is installed by `cargo install`, into $CARGO_HOME/bin.
    let cargo_home = env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env::var("HOME").unwrap_or_default()).join(".cargo"));
    let path = format!(
        "{}:{}",
        cargo_home.join("bin").display(),
        env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", &path);
    cmd.current_dir(&root).args([
        "build",
        "--package",
        "lb-ebpf",
        "--bin",
        "lb-ebpf",
        "--release",
        "--target",
        TARGET,
        "--target-dir",
    ]);
    cmd.arg(&target_dir);

    match choose_toolchain(&path) {
        Some(Toolchain::Explicit(rustc)) | Some(Toolchain::Debian(rustc)) => {
            // aya-ebpf uses unstable features on the BPF target; the Debian rustc is stable.
            cmd.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1");
        }
        Some(Toolchain::NightlyBuildStd) => {
            cmd.env("RUSTUP_TOOLCHAIN", "nightly")
                .args(["-Z", "build-std=core"]);
        }
        None => fail(
            "no Rust toolchain that can build for bpfel-unknown-none was found.\n\
             Run `cargo xtask setup` (as root on Debian/Ubuntu) to install rustc-web, \
             libstd-rust-web-dev-bpf, llvm-22-dev and bpf-linker, or install rustup nightly \
             with rust-src.",
        ),
    }
    if !which("bpf-linker", &path) {
        fail("bpf-linker is not installed. Run `cargo xtask setup`.");
    }

    let output = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("running {cargo}: {e}")));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines() {
            println!("cargo:warning={line}");
        }
        fail("building lb-ebpf for bpfel-unknown-none failed (see the warnings above)");
    }
    let object = target_dir.join(TARGET).join("release").join("lb-ebpf");
    let dest = out_dir.join("lb-ebpf.o");
    std::fs::copy(&object, &dest)
        .unwrap_or_else(|e| fail(&format!("copying {}: {e}", object.display())));
    println!("cargo:rustc-env=XLB_EBPF_OBJECT={}", dest.display());
}

enum Toolchain {
    Explicit(PathBuf),
    NightlyBuildStd,
    Debian(PathBuf),
}

fn choose_toolchain(path: &str) -> Option<Toolchain> {
    if let Ok(rustc) = env::var("XLB_EBPF_RUSTC") {
        return Some(Toolchain::Explicit(rustc.into()));
    }
    if which("rustup", path) {
        let sysroot = Command::new("rustup")
            .args(["run", "nightly", "rustc", "--print", "sysroot"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim().to_string()));
        if let Some(sysroot) = sysroot {
            if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
                return Some(Toolchain::NightlyBuildStd);
            }
        }
    }
    let debian = Path::new("/usr/bin/rustc");
    if debian.exists() && Path::new("/usr/lib/rustlib").join(TARGET).is_dir() {
        return Some(Toolchain::Debian(debian.to_path_buf()));
    }
    None
}

fn which(program: &str, path: &str) -> bool {
    path.split(':')
        .any(|dir| Path::new(dir).join(program).is_file())
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={msg}");
    std::process::exit(1);
}
