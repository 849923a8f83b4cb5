//! `cnclip` links no libtorch, and that follows from the dependency graph: neither the binary's
//! package nor the data-jobs library it is built on depends on `tch` (or anything that builds
//! libtorch bindings), so no module a binary declares can pull it in.
//!
//! Also read from the graph: the release profile's opt-level 1 list covers every DataFusion,
//! Ballista and sqlparser crate in it (the build-time setting of `Cargo.toml`).
//!
//! These are the `cnclip-cli` package's integration tests, so `cargo test --workspace` builds
//! the `cnclip` binary that `tests/` runs.

use std::process::Command;

/// `cargo tree` of `package`'s normal and build dependencies, one crate name per line.
fn dependencies(package: &str) -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "--offline", "--locked", "-e", "normal,build", "--prefix", "none", "--format", "{p}", "-p"])
        .arg(package)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).expect("cargo tree prints UTF-8")
}

fn crate_names(tree: &str) -> Vec<&str> {
    tree.lines().filter_map(|line| line.split_whitespace().next()).collect()
}

#[test]
fn cnclip_and_the_data_jobs_depend_on_no_libtorch_binding() {
    for package in ["cnclip-cli", "cnclip-data-jobs"] {
        let tree = dependencies(package);
        let names = crate_names(&tree);
        assert!(names.contains(&"cnclip-operators"), "{package}: an unexpected tree:\n{tree}");
        for torch in ["tch", "torch-sys", "cnclip-models", "cnclip-model-jobs"] {
            assert!(!names.contains(&torch), "{package} depends on {torch}:\n{tree}");
        }
    }
    // The check can fail: the model side does pull libtorch in.
    assert!(crate_names(&dependencies("cnclip-torch")).contains(&"tch"));
}

#[test]
fn the_cnclip_binary_loads_no_libtorch() {
    let output = Command::new("ldd").arg(env!("CARGO_BIN_EXE_cnclip")).output().expect("ldd runs");
    let libraries = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && libraries.contains("libc.so"), "ldd: {libraries}");
    assert!(!libraries.contains("torch"), "cnclip loads libtorch:\n{libraries}");
}

/// The workspace's `[profile.release.package]` names whose opt-level is 1.
fn release_opt_level_1() -> Vec<String> {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("the workspace manifest reads");
    let manifest: toml::Table = text.parse().expect("the workspace manifest parses");
    let packages = manifest["profile"]["release"]["package"].as_table().expect("[profile.release.package]");
    packages
        .iter()
        .filter(|(_, profile)| profile.get("opt-level").and_then(toml::Value::as_integer) == Some(1))
        .map(|(name, _)| name.clone())
        .collect()
}

#[test]
fn every_datafusion_ballista_and_sqlparser_crate_is_built_at_opt_level_1_in_release() {
    let listed = release_opt_level_1();
    let tree = dependencies("cnclip-torch") + &dependencies("cnclip-cli");
    let mut sql_crates: Vec<&str> = crate_names(&tree)
        .into_iter()
        .filter(|name| ["datafusion", "ballista", "sqlparser"].iter().any(|prefix| name.starts_with(prefix)))
        .collect();
    sql_crates.sort_unstable();
    sql_crates.dedup();
    assert!(sql_crates.len() > 30 && sql_crates.contains(&"datafusion-physical-plan"), "an unexpected tree:\n{tree}");
    let missing: Vec<&&str> = sql_crates.iter().filter(|name| !listed.iter().any(|l| l == **name)).collect();
    assert!(missing.is_empty(), "add to Cargo.toml's [profile.release.package] at opt-level 1: {missing:?}");
    // What is not a SQL crate stays at the release default: the arrow kernels and ours.
    for name in &listed {
        assert!(
            sql_crates.contains(&name.as_str()) || name == "torch-sys",
            "{name} is at opt-level 1 in release but is not a DataFusion, Ballista or sqlparser crate"
        );
    }
}
