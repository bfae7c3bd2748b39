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
    let page = store.read(UNIT, None, 10).await.unwrap();
    drop(store);
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    store.append(&[sample_request("b")]).await.unwrap();
    let page2 = store
        .read(UNIT, page.position.as_deref(), 10)
        .await
        .unwrap();
    assert_eq!(page2.records.len(), 1);
    assert_eq!(page2.records[0].request_id(), "b");
}

#[tokio::test]
async fn bad_position_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    assert!(matches!(
        store.read(UNIT, Some("zz"), 1).await,
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
    let page = store.read(UNIT, None, 10).await.unwrap();
    let ids: Vec<String> = page.records.iter().map(RawRecord::id).collect();
    assert_eq!(ids, vec!["a:0", "b:0"]);
    assert_eq!(page.dead_letters.len(), 1);
    let letter = &page.dead_letters[0];
    assert_eq!(letter.record_id.as_deref(), Some("bad:0"));
    assert_eq!(letter.document, r#"{"kind":"request"}"#);
    assert!(store.read_request("bad").await.unwrap().is_empty());
    let rest = store
        .read(UNIT, page.position.as_deref(), 10)
        .await
        .unwrap();
    assert!(rest.records.is_empty() && rest.dead_letters.is_empty());
}

/// A database from before the `unpriced` column: opened, it gains the column, and requests
/// whose record has tokens but no cost (stored then with a cost of 0) are marked unpriced.
#[tokio::test]
async fn an_older_database_gains_the_unpriced_column() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        let old_schema = SCHEMA.replace(",\n    unpriced INTEGER NOT NULL DEFAULT 0", "");
        assert_ne!(old_schema, SCHEMA, "the old schema lacks the column");
        conn.execute_batch(&old_schema).unwrap();
        let mut priced = crate::conformance::sample_consolidated("priced", "a", 1, 10);
        let m = tollgate_records::Money::from_nanos;
        priced.cost = Some(tollgate_records::Cost {
            input: m(1_000_000_000),
            cached_input: m(0),
            output: m(1_000_000_000),
            total: m(2_000_000_000),
            currency: "USD".into(),
            price_table_version: "t".into(),
            price_multiplier: None,
        });
        let unpriced = crate::conformance::sample_consolidated("unpriced", "a", 1, 10);
        for r in [priced, unpriced] {
            conn.execute(
                "INSERT INTO requests (id, time_ms, day, consumer, deployment, model, operation,
                    status, input_tokens, cached_input_tokens, output_tokens, total_tokens,
                    estimated, cost, doc)
                 VALUES (?1, 0, '2026-11-01', 'a', 'd', 'gpt-4o', 'chat.completions', 200,
                    10, 0, 10, 20, 0, ?2, ?3)",
                params![
                    r.id,
                    r.cost.as_ref().map_or(0.0, |c| c.total.as_f64()),
                    serde_json::to_string(&r).unwrap()
                ],
            )
            .unwrap();
        }
    }
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    let rows = store.usage(&RecordQuery::default()).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].requests, rows[0].unpriced_requests), (2, 1));
    assert_eq!(
        rows[0].cost,
        tollgate_records::Money::from_nanos(2_000_000_000)
    );
    // Opening again finds the column and changes nothing.
    drop(store);
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    let rows = store.usage(&RecordQuery::default()).await.unwrap();
    assert_eq!(rows[0].unpriced_requests, 1);
}

/// A store an earlier version wrote kept the parser's checkpoint by name; the group's lease
/// starts from it, so an upgrade neither re-reads nor skips the feed.
#[tokio::test]
async fn a_checkpoint_saved_by_name_becomes_the_groups_first_lease() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 1000).await.unwrap();
    store
        .write(|conn| {
            conn.execute(
                "INSERT INTO checkpoints (name, doc) VALUES ('log-parser', '{\"position\":\"17\",\"pending\":[]}')",
                [],
            )
            .map_err(io)?;
            Ok(())
        })
        .await
        .unwrap();
    let lease = crate::lease::acquire(
        &store,
        "log-parser",
        UNIT,
        "me",
        chrono::Duration::seconds(10),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(lease.checkpoint().position.as_deref(), Some("17"));
    assert_eq!(
        crate::load_checkpoint(&store, "other", UNIT).await.unwrap(),
        None
    );
}
