//! The consumer registry in the `leases` container: one document per consumer, id
//! `consumer.{id}`, kind `consumer`, the proxy's document under `doc`, written with `If-Match`
//! on its etag.

use async_trait::async_trait;
use azure_data_cosmos::{FeedScope, Query};
use serde::{Deserialize, Serialize};

use super::{CosmosStore, Written, find, query_all, write_if};
use crate::{ConsumerRegistry, StoreError, StoredConsumer};

#[derive(Serialize, Deserialize)]
struct ConsumerItem {
    id: String,
    kind: String,
    consumer: String,
    doc: serde_json::Value,
    #[serde(rename = "_etag", default, skip_serializing)]
    etag: Option<String>,
}

fn item_id(id: &str) -> Result<String, StoreError> {
    if !crate::valid_consumer_id(id) {
        return Err(StoreError::Config(format!(
            "{id:?} cannot name a registered consumer (letters, digits, . _ - only, at most 64)"
        )));
    }
    Ok(format!("consumer.{id}"))
}

fn stored(item: ConsumerItem) -> Result<StoredConsumer, StoreError> {
    Ok(StoredConsumer {
        version: item
            .etag
            .ok_or_else(|| super::corrupt("consumer document without an etag"))?,
        id: item.consumer,
        document: item.doc,
    })
}

#[async_trait]
impl ConsumerRegistry for CosmosStore {
    async fn consumers(&self) -> Result<Vec<StoredConsumer>, StoreError> {
        let items: Vec<ConsumerItem> = query_all(
            &self.leases,
            Query::from("SELECT * FROM c WHERE c.kind = 'consumer'"),
            FeedScope::full_container(),
        )
        .await?;
        let mut out = items
            .into_iter()
            .map(stored)
            .collect::<Result<Vec<_>, _>>()?;
        // Sorted here: a cross-partition ORDER BY needs the query pipeline.
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn consumer(&self, id: &str) -> Result<Option<StoredConsumer>, StoreError> {
        find::<ConsumerItem>(&self.leases, &item_id(id)?)
            .await?
            .map(stored)
            .transpose()
    }

    async fn put_consumer(
        &self,
        id: &str,
        document: &serde_json::Value,
        expected: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let item_id = item_id(id)?;
        let item = ConsumerItem {
            id: item_id.clone(),
            kind: "consumer".into(),
            consumer: id.to_owned(),
            doc: document.clone(),
            etag: None,
        };
        match write_if(&self.leases, &item_id, &item, expected).await? {
            Written::Etag(etag) => Ok(Some(etag)),
            Written::Unknown => Ok(self.consumer(id).await?.map(|c| c.version)),
            Written::Refused => Ok(None),
        }
    }
}
