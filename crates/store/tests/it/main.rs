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

/// A record over Cosmos DB's 2 MB item limit is refused by name before anything of the batch is
/// sent (Cosmos would fail the whole transactional batch); the proxy's writer sets that record
/// aside and writes the rest again, where the record already stored is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosmos_refuses_only_the_oversized_record_of_a_batch() {
    use tollgate_store::StoreError;
    use tollgate_store::conformance::{sample_chunk, sample_end, sample_request};
    let config = tollgate_store::conformance::cosmos_test_config(&format!(
        "oversized-{}",
        std::process::id()
    ));
    let store = tollgate_store::open(&tollgate_store::StoreConfig::Cosmos(config))
        .await
        .expect("open cosmos store");
    store
        .append(&[sample_request("big")])
        .await
        .expect("first record");
    let huge = "x".repeat(2_100_000);
    let batch = [
        sample_request("big"),
        sample_chunk("big", 1, &huge),
        sample_end("big", 2),
    ];
    match store.append(&batch).await {
        Err(StoreError::Rejected { id, .. }) => assert_eq!(id, "big:1"),
        other => panic!("the oversized record is refused by name: {other:?}"),
    }
    // What the writer does next: the batch again without the refused record.
    store
        .append(&[sample_request("big"), sample_end("big", 2)])
        .await
        .expect("the rest is stored");
    let stored = store.read_request("big").await.expect("read");
    assert_eq!(
        stored
            .iter()
            .map(tollgate_records::RawRecord::seq)
            .collect::<Vec<_>>(),
        vec![0, 2]
    );
}

mod cosmos_queries;

/// An existing container keyed otherwise than Tollgate writes would refuse every write (400),
/// each refused record set aside as if at fault: the store refuses to open on it, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosmos_refuses_a_container_with_another_partition_key() {
    let config = tollgate_store::conformance::cosmos_test_config(&format!(
        "wrongkey-{}",
        std::process::id()
    ));
    let client = tollgate_store::cosmos::connect(&config)
        .await
        .expect("client");
    client
        .create_database(&config.database, None)
        .await
        .expect("database");
    client
        .database_client(config.database.clone())
        .create_container(
            azure_data_cosmos::models::ContainerProperties::new("raw", "/id".into()),
            None,
        )
        .await
        .expect("container");
    match tollgate_store::open(&tollgate_store::StoreConfig::Cosmos(config)).await {
        Err(tollgate_store::StoreError::Config(e)) => {
            assert!(e.contains("\"raw\"") && e.contains("/shard"), "{e}");
        }
        Ok(_) => panic!("opened a raw container keyed by /id"),
        Err(e) => panic!("{e}"),
    }
}

/// Found in review: the feed positions saved in the leases belong to one raw container; after
/// it is deleted and recreated the SDK refuses them for ever, and every unit stalled. The store
/// now refuses to open and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosmos_names_a_recreated_raw_container() {
    let config = tollgate_store::conformance::cosmos_test_config(&format!(
        "recreated-{}",
        std::process::id()
    ));
    tollgate_store::open(&tollgate_store::StoreConfig::Cosmos(config.clone()))
        .await
        .expect("first start");
    let client = tollgate_store::cosmos::connect(&config)
        .await
        .expect("client");
    let database = client.database_client(config.database.clone());
    database
        .container_client("raw", None)
        .await
        .expect("raw")
        .delete(None)
        .await
        .expect("delete raw");
    database
        .create_container(
            azure_data_cosmos::models::ContainerProperties::new("raw", "/shard".into()),
            None,
        )
        .await
        .expect("recreate raw");
    match tollgate_store::open(&tollgate_store::StoreConfig::Cosmos(config)).await {
        Err(tollgate_store::StoreError::Config(e)) => {
            assert!(e.contains("was recreated"), "{e}");
        }
        Ok(_) => panic!("opened with checkpoints of a container that is gone"),
        Err(e) => panic!("{e}"),
    }
}
