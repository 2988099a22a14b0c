//! Chat flows: one active version per service and name; earlier versions are kept for
//! comparison.

use super::{Op, SerializedBegin, Store, StoreError, now, on_pool};
use crate::flow::Flow;

impl Store {
    /// Stores `flow` as the service's active flow, as the next version. Earlier versions stay,
    /// inactive. Keeps the flow's id unless another stored flow has it.
    pub async fn save_flow(&self, mut flow: Flow) -> Result<Flow, StoreError> {
        flow.validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let versions_of = format!("{}/{}", flow.service, flow.name);
        on_pool!(self, Op::Write, |pool| {
            // Reads the latest version, then writes the next: two saves (two instances
            // re-learning, say) must not both take the same number.
            let mut tx = pool.begin_serialized(&versions_of).await?;
            let taken: Option<String> = if flow.id.is_empty() {
                None
            } else {
                sqlx::query_scalar("SELECT id FROM chat_flows WHERE id = $1")
                    .bind(&flow.id)
                    .fetch_optional(&mut *tx)
                    .await?
            };
            if taken.is_some() {
                flow.id.clear();
            }
            flow.ensure_id();
            let latest: Option<i64> = sqlx::query_scalar(
                "SELECT MAX(version) FROM chat_flows WHERE service = $1 AND name = $2",
            )
            .bind(&flow.service)
            .bind(&flow.name)
            .fetch_one(&mut *tx)
            .await?;
            if let Some(latest) = latest {
                flow.version = flow.version.max(latest as u32 + 1);
            }
            sqlx::query("UPDATE chat_flows SET active = FALSE WHERE service = $1 AND name = $2")
                .bind(&flow.service)
                .bind(&flow.name)
                .execute(&mut *tx)
                .await?;
            let json = serde_json::to_string(&flow)
                .map_err(|e| StoreError::Invalid(format!("flow: {e}")))?;
            let now = now();
            sqlx::query(
                "INSERT INTO chat_flows (id, service, name, version, active, flow_json, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, TRUE, $5, $6, $7)",
            )
            .bind(&flow.id)
            .bind(&flow.service)
            .bind(&flow.name)
            .bind(i64::from(flow.version))
            .bind(json)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await?;
        Ok(flow)
    }

    /// Stores a flow from a file or the admin API as the next version, once every call with a
    /// fixed origin is known to stay on the service's accounts' origins or `allowed_origins`.
    pub async fn import_flow(
        &self,
        flow: Flow,
        allowed_origins: &[String],
    ) -> Result<Flow, StoreError> {
        flow.validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        let accounts = self.accounts_for_service(&flow.service).await?;
        let urls: Vec<url::Url> = accounts
            .iter()
            .filter_map(|a| url::Url::parse(&a.url).ok())
            .collect();
        crate::pinning::check_import(&flow, &urls, allowed_origins)
            .map_err(|e| StoreError::Invalid(format!("flow is not usable: {e}")))?;
        self.save_flow(flow).await
    }

    /// Records origins the site's own page called while this machine learned `flow_id`; its
    /// calls may reach them with the account's session.
    pub async fn trust_flow_origins(
        &self,
        flow_id: &str,
        origins: &[String],
    ) -> Result<(), StoreError> {
        on_pool!(self, Op::Write, |pool| {
            let mut tx = pool.begin().await?;
            for origin in origins {
                sqlx::query(
                    "INSERT INTO flow_origins (flow_id, origin, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                )
                .bind(flow_id)
                .bind(origin)
                .bind(now())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Origins recorded by [`Store::trust_flow_origins`].
    pub async fn trusted_flow_origins(&self, flow_id: &str) -> Result<Vec<String>, StoreError> {
        on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_scalar(
                "SELECT origin FROM flow_origins WHERE flow_id = $1 ORDER BY origin",
            )
            .bind(flow_id)
            .fetch_all(pool)
            .await?)
        })
        .await
    }

    /// Active flows, or every version with `all`.
    pub async fn flows(&self, all: bool) -> Result<Vec<StoredFlow>, StoreError> {
        let sql = if all {
            "SELECT id, active, flow_json, created_at FROM chat_flows
             ORDER BY service, name, version DESC"
        } else {
            "SELECT id, active, flow_json, created_at FROM chat_flows WHERE active = TRUE
             ORDER BY service, name"
        };
        let rows: Vec<FlowRow> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(sql).fetch_all(pool).await?)
        })
        .await?;
        rows.into_iter().map(stored_flow).collect()
    }

    pub async fn flow(&self, id: &str) -> Result<StoredFlow, StoreError> {
        let row: Option<FlowRow> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT id, active, flow_json, created_at FROM chat_flows WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?)
        })
        .await?;
        stored_flow(row.ok_or_else(|| StoreError::NotFound(format!("flow `{id}`")))?)
    }

    /// The flow replay uses for `service`.
    pub async fn active_flow(&self, service: &str) -> Result<Option<Flow>, StoreError> {
        let row: Option<FlowRow> = on_pool!(self, Op::Read, |pool| {
            Ok(sqlx::query_as(
                "SELECT id, active, flow_json, created_at FROM chat_flows
                 WHERE service = $1 AND name = 'chat' AND active = TRUE
                 ORDER BY version DESC LIMIT 1",
            )
            .bind(service)
            .fetch_optional(pool)
            .await?)
        })
        .await?;
        row.map(|r| stored_flow(r).map(|s| s.flow)).transpose()
    }

    /// Deletes one flow version. When it was the active one, the newest remaining version of
    /// the same service becomes active.
    pub async fn delete_flow(&self, id: &str) -> Result<StoredFlow, StoreError> {
        let stored = self.flow(id).await?;
        on_pool!(self, Op::Write, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM chat_flows WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if stored.active {
                sqlx::query(
                    "UPDATE chat_flows SET active = TRUE WHERE id = (SELECT id FROM chat_flows
                     WHERE service = $1 AND name = $2 ORDER BY version DESC LIMIT 1)",
                )
                .bind(&stored.flow.service)
                .bind(&stored.flow.name)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await?;
        Ok(stored)
    }
}

/// A flow with its storage state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredFlow {
    pub active: bool,
    pub created_at: i64,
    #[serde(flatten)]
    pub flow: Flow,
}

/// The `chat_flows` columns a [`StoredFlow`] is read from.
#[derive(sqlx::FromRow)]
struct FlowRow {
    id: String,
    active: bool,
    flow_json: String,
    created_at: i64,
}

fn stored_flow(row: FlowRow) -> Result<StoredFlow, StoreError> {
    let flow: Flow = serde_json::from_str(&row.flow_json)
        .map_err(|e| StoreError::Invalid(format!("stored flow {} does not parse: {e}", row.id)))?;
    Ok(StoredFlow {
        active: row.active,
        created_at: row.created_at,
        flow,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::on_both_engines;

    fn flow(service: &str) -> Flow {
        Flow::from_json(&format!(
            r#"{{"service":"{service}","request":{{"url":"/c"}},
                "response":{{"transport":"json","text":{{"path":"/t","mode":"delta"}}}}}}"#
        ))
        .unwrap()
    }

    on_both_engines! {
        async fn re_saving_keeps_the_previous_version_inactive(_db, store) {
            let first = store.save_flow(flow("svc")).await.unwrap();
            let second = store.save_flow(flow("svc")).await.unwrap();
            assert_eq!((first.version, second.version), (1, 2));
            assert_ne!(first.id, second.id);
            assert_eq!(
                store.active_flow("svc").await.unwrap().unwrap().id,
                second.id
            );
            assert_eq!(store.flows(false).await.unwrap().len(), 1);
            assert_eq!(store.flows(true).await.unwrap().len(), 2);
            store.delete_flow(&second.id).await.unwrap();
            assert_eq!(
                store.active_flow("svc").await.unwrap().unwrap().id,
                first.id
            );
        }

        /// An imported flow may not call an origin no account of its service is on; one learned
        /// here keeps the origins its page called.
        async fn imports_are_pinned_to_the_accounts_origins(_db, store) {
            store
                .add_account(crate::store::accounts::NewAccount {
                    url: "https://chat.site.test/".into(),
                    service: Some("svc".into()),
                    email: None,
                    password: None,
                    proxy: None,
                })
                .await
                .unwrap();
            let mut foreign = flow("svc");
            foreign.request.url = "https://collector.evil.test/c".into();
            let err = store.import_flow(foreign.clone(), &[]).await.unwrap_err();
            assert!(
                err.to_string().contains("https://collector.evil.test"),
                "{err}"
            );
            assert!(store.active_flow("svc").await.unwrap().is_none());
            let listed = ["https://collector.evil.test".to_owned()];
            store.import_flow(foreign, &listed).await.unwrap();
            let mut own = flow("svc");
            own.request.url = "https://chat.site.test/api".into();
            let saved = store.import_flow(own, &[]).await.unwrap();
            assert!(
                store
                    .trusted_flow_origins(&saved.id)
                    .await
                    .unwrap()
                    .is_empty()
            );
            store
                .trust_flow_origins(&saved.id, &["https://api.site.test".to_owned()])
                .await
                .unwrap();
            assert_eq!(
                store.trusted_flow_origins(&saved.id).await.unwrap(),
                vec!["https://api.site.test".to_owned()]
            );
        }

        async fn importing_the_same_file_twice_gets_a_fresh_id(_db, store) {
            let mut f = flow("svc");
            f.id = "f_fixed".into();
            let a = store.save_flow(f.clone()).await.unwrap();
            let b = store.save_flow(f).await.unwrap();
            assert_eq!(a.id, "f_fixed");
            assert_ne!(b.id, "f_fixed");
        }

        /// Saves that race (two instances re-learning one service) still number the versions
        /// one by one and leave one active.
        async fn concurrent_saves_take_distinct_versions(db, store) {
            let other = db.open(1).await.unwrap();
            let saves = (0..6).map(|i| {
                let store = if i % 2 == 0 { store.clone() } else { other.clone() };
                async move { store.save_flow(flow("svc")).await.unwrap().version }
            });
            let mut versions = futures_util::future::join_all(saves).await;
            versions.sort();
            assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
            assert_eq!(store.flows(false).await.unwrap().len(), 1);
            assert_eq!(store.active_flow("svc").await.unwrap().unwrap().version, 6);
        }
    }
}
