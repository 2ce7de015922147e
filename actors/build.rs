//! Sets the cfg `phalanx_avx512` when the compiler has the AVX-512 target feature and
//! intrinsics, stable since Rust 1.89: the kernels' AVX-512 path (`src/model/dense.rs`) is built
//! then, and toolchains from the workspace's `rust-version` up to 1.88 build without it (their
//! kernels take the AVX2 path, with the same bits).

use std::process::Command;

/// The first Rust release with `#[target_feature(enable = "avx512f")]` and `_mm512_*` stable.
const AVX512_SINCE_MINOR: u32 = 89;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(phalanx_avx512)");
    println!("cargo::rerun-if-env-changed=RUSTC");
    if rustc_minor().is_some_and(|minor| minor >= AVX512_SINCE_MINOR) {
        println!("cargo::rustc-cfg=phalanx_avx512");
    }
}

/// The minor version of the compiler cargo runs, from `rustc 1.95.0 (59807616e 2026-04-14)`.
fn rustc_minor() -> Option<u32> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut parts = text.split_whitespace().nth(1)?.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}
