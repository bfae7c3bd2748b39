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

/// Defect: one stored document that could not be read failed the whole feed page, and the
/// parser re-read that page for ever. Now the page carries it as a dead letter and moves on.
#[tokio::test]
async fn unreadable_document_is_a_dead_letter_and_the_feed_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    store.append(&[sample_request("a")]).await.unwrap();
    store
        .write(|conn| {
            conn.execute(
                "INSERT INTO raw (request_id, seq, kind, doc) VALUES ('bad', 0, 'request', '{\"kind\":\"request\"}')",
                [],
            )
            .map_err(io)?;
            Ok(())
        })
        .await
        .unwrap();
    store.append(&[sample_request("b")]).await.unwrap();
    let page = store.read(None, 10).await.unwrap();
    let ids: Vec<String> = page.records.iter().map(RawRecord::id).collect();
    assert_eq!(ids, vec!["a:0", "b:0"]);
    assert_eq!(page.dead_letters.len(), 1);
    let letter = &page.dead_letters[0];
    assert_eq!(letter.record_id.as_deref(), Some("bad:0"));
    assert_eq!(letter.document, r#"{"kind":"request"}"#);
    assert!(store.read_request("bad").await.unwrap().is_empty());
    let rest = store.read(page.position.as_deref(), 10).await.unwrap();
    assert!(rest.records.is_empty() && rest.dead_letters.is_empty());
}
