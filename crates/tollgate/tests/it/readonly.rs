//! Commands that only read (`report`, `check`) refuse a data directory with no store, instead
//! of creating an empty one there and reporting zeros.

use std::process::Command;

fn tollgate(args: &[&str], cwd: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .current_dir(cwd)
        .env_remove("TOLLGATE_CONFIG")
        .output()
        .expect("tollgate runs")
}

/// Defect: a mistyped `--data-dir` created an empty store there and printed a report of zeros.
#[test]
fn report_on_a_directory_without_a_store_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("daat");
    let out = tollgate(
        &["report", "--data-dir", typo.to_str().unwrap()],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("holds no Tollgate store"), "{stderr}");
    assert!(
        stderr.contains("daat"),
        "the error names the directory: {stderr}"
    );
    assert!(!typo.exists(), "nothing was created");
}

/// Defect: `tollgate check` from another folder created `./data` with an empty store (and a
/// spool and journal) and said all was well.
#[test]
fn check_from_a_folder_without_a_store_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = tollgate(&["check"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("holds no Tollgate store"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing was created in the working directory"
    );
}
