//! Runs the store conformance suite against every backend available here.

#[tokio::test]
async fn embedded_backend_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = tollgate_store::open(&tollgate_store::StoreConfig::embedded(dir.path()))
        .await
        .expect("open embedded store");
    tollgate_store::conformance::run(store.as_ref()).await;
}
