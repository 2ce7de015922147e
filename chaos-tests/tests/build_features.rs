//! A default build of `phalanx` carries no in-process fault hook (DESIGN: "The product crates
//! carry no hook whose only job is to break them"); the chaos harness's build carries them all.
//!
//! The hooks (actor panics, a crash before a checkpoint rename, an aggregator that counts
//! duplicates, a rogue member and the raw frames it sends) exist only under
//! `#[cfg(feature = "fault-injection")]` in `phalanx-actors`, `phalanx-transport` and
//! `phalanx`, so what a build contains is decided by the features cargo resolves for it.
//! `cargo test --workspace` unifies features (the harness and the tests enable this one), so
//! no test binary can observe a default build directly, and building a second release binary
//! is too slow for CI; instead cargo itself is asked what `cargo build -p phalanx` would
//! enable (normal and build dependencies, no dev-dependencies), which takes no compilation.
//! `.ci/run` also lints that default build, so it compiles without the hooks.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use phalanx_chaos::process::{find_phalanx, has_fault_injection};

const FEATURE: &str = "fault-injection";

/// Features cargo resolves for each workspace package when building `package` with its
/// default features and without dev-dependencies, as `cargo build -p package` does.
fn resolved_features(package: &str) -> BTreeMap<String, Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["tree", "--locked", "--offline", "-p", package, "-e", "no-dev", "--prefix", "none"])
        .args(["-f", "{p}|{f}"])
        .output()
        .expect("running cargo tree");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree -p {package}: {}{text}", String::from_utf8_lossy(&out.stderr));
    let mut features = BTreeMap::new();
    for line in text.lines() {
        // `phalanx v0.1.0 (/path/runtime)|fault-injection` (features comma-separated).
        let Some((id, list)) = line.trim_end_matches(" (*)").split_once('|') else { continue };
        if !id.contains(&root.display().to_string()) {
            continue;
        }
        let name = id.split(' ').next().unwrap_or_default().to_string();
        let list = list.split(',').filter(|f| !f.is_empty()).map(str::to_string).collect();
        features.insert(name, list);
    }
    features
}

#[test]
fn a_default_build_of_phalanx_has_no_fault_hooks() {
    let features = resolved_features("phalanx");
    for crate_name in ["phalanx", "phalanx-actors", "phalanx-transport"] {
        let enabled = features.get(crate_name).unwrap_or_else(|| panic!("{crate_name} in {features:?}"));
        assert!(!enabled.iter().any(|f| f == FEATURE), "cargo build -p phalanx enables {crate_name}/{FEATURE}");
    }
}

#[test]
fn the_harness_builds_both_crates_with_the_fault_hooks() {
    // The same question about the harness, which must see the feature: the check above
    // reads what it claims to read.
    let features = resolved_features("phalanx-chaos");
    for crate_name in ["phalanx", "phalanx-actors", "phalanx-transport"] {
        let enabled = features.get(crate_name).unwrap_or_else(|| panic!("{crate_name} in {features:?}"));
        assert!(enabled.iter().any(|f| f == FEATURE), "{crate_name}: {enabled:?}");
    }
}

#[test]
fn the_phalanx_binary_the_harness_runs_has_the_fault_flags() {
    let exe = find_phalanx().expect("the phalanx binary next to this test: run the workspace tests");
    assert!(has_fault_injection(&exe).unwrap(), "{} --version", exe.display());
    let help = |args: &[&str]| {
        let out = Command::new(&exe).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(help(&["train", "--help"]).contains("--fail"));
    assert!(help(&["local", "--help"]).contains("--crash-before-rename"));
    assert!(help(&["node", "--help"]).contains("--crash-before-rename"));
    assert!(help(&["local", "--help"]).contains("--rogue"));
    assert!(help(&["node", "--help"]).contains("--rogue"));
    // Faults from outside are in every build.
    assert!(help(&["local", "--help"]).contains("--kill"));
}
