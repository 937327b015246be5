//! What a newcomer's `Cargo.toml` meets is true: the declared `rust-version` is no lower than
//! what any locked dependency of a user's build declares (no older toolchain can be installed
//! here to try it, so it is derived from the lock file).

use std::process::Command;

use serde_json::Value;

/// `1.88` and `1.88.0` alike, as `[1, 88, 0]`.
fn version(text: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = text.split('.').map(|part| part.parse().unwrap()).collect();
    parts.resize(3, 0);
    parts
}

#[test]
fn the_declared_rust_version_covers_every_locked_dependency() {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--all-features", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let packages = metadata["packages"].as_array().unwrap();
    let package = |id: &str| packages.iter().find(|p| p["id"] == id).unwrap();
    let nodes = metadata["resolve"]["nodes"].as_array().unwrap();
    let node = |id: &str| nodes.iter().find(|n| n["id"] == id).unwrap();

    for member in metadata["workspace_members"].as_array().unwrap() {
        let member = member.as_str().unwrap();
        let declared = version(package(member)["rust_version"].as_str().expect("rust-version"));
        // Everything a user's build compiles: the member's normal and build dependencies,
        // and all of theirs.
        let mut seen = std::collections::BTreeSet::new();
        let mut todo = vec![member.to_owned()];
        let mut highest = (Vec::new(), String::new());
        while let Some(id) = todo.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(needed) = package(&id)["rust_version"].as_str() {
                if version(needed) > highest.0 {
                    highest = (version(needed), package(&id)["name"].to_string());
                }
            }
            for dependency in node(&id)["deps"].as_array().unwrap() {
                let kinds = dependency["dep_kinds"].as_array().unwrap();
                if id != member || kinds.iter().any(|k| k["kind"] != "dev") {
                    todo.push(dependency["pkg"].as_str().unwrap().to_owned());
                }
            }
        }
        assert!(
            declared >= highest.0,
            "{member} declares rust-version {declared:?}, but {} needs {:?}",
            highest.1,
            highest.0
        );
    }
}
