//! `computetower migrate`: applies the store's migrations and reports the schema version.
//! Every command migrates when it opens the store; this one does only that, so an operator
//! can upgrade a shared PostgreSQL before starting the new instances.

use super::{CliResult, print_json};
use crate::config::Config;

pub async fn run(json: bool, config: &Config) -> CliResult {
    let location = config.store_location()?;
    let store = crate::server::open_store(config).await?;
    let schema = store.schema();
    if json {
        print_json(&serde_json::json!({
            "engine": store.engine().as_str(),
            "store": location.describe(),
            "version": schema.version,
            "applied": schema.applied_now,
        }))?;
    } else {
        let applied = if schema.applied_now.is_empty() {
            "up to date".to_owned()
        } else {
            let list: Vec<String> = schema.applied_now.iter().map(i64::to_string).collect();
            format!("applied {}", list.join(", "))
        };
        println!(
            "{}: schema version {} ({applied})",
            location.describe(),
            schema.version
        );
    }
    store.close().await;
    Ok(())
}
