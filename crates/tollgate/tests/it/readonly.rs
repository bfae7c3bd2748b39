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

/// `tollgate check` on a Cosmos DB store connects and names everything missing, creating
/// nothing even where the configuration would let `tollgate up` create it; once the containers
/// exist it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_cosmos_names_what_is_missing_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cosmos =
        tollgate_store::conformance::cosmos_test_config(&format!("check-{}", std::process::id()));
    let config = dir.path().join("tollgate.toml");
    // What `tollgate up` would be allowed to create: `check` must create nothing all the same.
    let mut allowed = cosmos.clone();
    allowed.create_if_missing = true;
    std::fs::write(&config, tollgate_store::conformance::cosmos_toml(&allowed)).unwrap();
    let check = || tollgate(&["--config", config.to_str().unwrap(), "check"], dir.path());
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    for missing in [
        cosmos.database.as_str(),
        "\"raw\"",
        "\"requests\"",
        "\"leases\"",
    ] {
        assert!(stderr.contains(missing), "names {missing}: {stderr}");
    }
    let out = check();
    assert!(
        !out.status.success(),
        "still missing: check created nothing"
    );

    tollgate_store::open(&tollgate_store::StoreConfig::Cosmos(cosmos))
        .await
        .expect("create the store");
    let out = check();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("store reachable"));
}

/// Found in review: two processes on one data directory replayed each other's journal and
/// spool and shared a parser replica name, so both read every feed unit. The second is refused;
/// once the first is gone (even killed), the directory is free again.
#[test]
fn a_second_process_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let up_config = crate::up::UpConfig {
        env: &[],
        consumer: "c",
        key: "k",
        admin_key: "a",
        sections: "",
    };
    let first = crate::up::Up::start(dir.path(), &data, "first", &up_config);
    let config = dir.path().join("tollgate.toml");
    let second = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["up", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .expect("run a second tollgate up");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("another Tollgate process uses"), "{stderr}");
    {
        let mut child = first.child.lock().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let again = crate::up::Up::start(dir.path(), &data, "again", &up_config);
    drop(again);
}
