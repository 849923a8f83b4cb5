//! `cnclip` links no libtorch, and that follows from the dependency graph: neither the binary's
//! package nor the data-jobs library it is built on depends on `tch` (or anything that builds
//! libtorch bindings), so no module a binary declares can pull it in.
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
