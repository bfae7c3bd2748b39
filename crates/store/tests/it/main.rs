//! Runs the store conformance suite against every backend available here.

#[tokio::test]
async fn embedded_backend_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = tollgate_store::open(&tollgate_store::StoreConfig::embedded(dir.path()))
        .await
        .expect("open embedded store");
    tollgate_store::conformance::run(store.as_ref()).await;
}

/// The same suite on the Cosmos DB backend, against the Cosmos test server (a local server
/// speaking the NoSQL wire protocol, started for this test process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosmos_backend_conforms() {
    let config = tollgate_store::conformance::cosmos_test_config(&format!(
        "conformance-{}",
        std::process::id()
    ));
    let store = tollgate_store::open(&tollgate_store::StoreConfig::Cosmos(config))
        .await
        .expect("open cosmos store");
    tollgate_store::conformance::run(store.as_ref()).await;
}
