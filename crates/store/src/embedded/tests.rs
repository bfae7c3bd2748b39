use super::*;
use crate::conformance::{sample_chunk, sample_request};

#[tokio::test]
async fn data_and_positions_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    store
        .append(&[sample_request("a"), sample_chunk("a", 1, "x")])
        .await
        .unwrap();
    let page = store.read(None, 10).await.unwrap();
    drop(store);
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    store.append(&[sample_request("b")]).await.unwrap();
    let page2 = store.read(page.position.as_deref(), 10).await.unwrap();
    assert_eq!(page2.records.len(), 1);
    assert_eq!(page2.records[0].request_id(), "b");
}

#[tokio::test]
async fn bad_position_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    assert!(matches!(
        store.read(Some("zz"), 1).await,
        Err(StoreError::Corrupt(_))
    ));
}
