//! `computetower flows …`

use std::path::PathBuf;

use clap::Subcommand;

use super::{CliResult, print_json, print_table};
use crate::config::Config;
use crate::flow::Flow;
use crate::store::Store;
use crate::store::flows::StoredFlow;

#[derive(Debug, Subcommand)]
pub enum FlowsCommand {
    /// List active flows (every version with --all).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one flow (by id, or the active flow of a service) as JSON.
    Show { flow: String },
    /// Import a flow file; it becomes the service's active flow.
    Import {
        file: PathBuf,
        /// Use it for this service instead of the one in the file.
        #[arg(long)]
        service: Option<String>,
    },
    /// Write a flow to a file (default flows/<service>.json).
    Export {
        flow: String,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Delete one flow version.
    Delete { flow: String },
}

async fn find(store: &Store, id_or_service: &str) -> Result<StoredFlow, crate::store::StoreError> {
    match store.flow(id_or_service).await {
        Ok(found) => Ok(found),
        Err(crate::store::StoreError::NotFound(_)) => {
            let active = store.active_flow(id_or_service).await?.ok_or_else(|| {
                crate::store::StoreError::NotFound(format!("flow or service `{id_or_service}`"))
            })?;
            store.flow(&active.id).await
        }
        Err(e) => Err(e),
    }
}

pub async fn run(cmd: FlowsCommand, config: &Config) -> CliResult {
    let store = crate::server::open_store(config).await?;
    match cmd {
        FlowsCommand::List { all, json } => {
            let flows = store.flows(all).await?;
            if json {
                let shown: Vec<_> = flows
                    .into_iter()
                    .map(|mut s| {
                        s.flow = s.flow.redacted();
                        s
                    })
                    .collect();
                print_json(&shown)?;
            } else {
                let rows = flows
                    .iter()
                    .map(|s| {
                        let f = &s.flow;
                        vec![
                            f.id.clone(),
                            f.service.clone(),
                            format!("v{}", f.version),
                            if s.active { "active" } else { "old" }.to_owned(),
                            format!("{:?}", f.response.transport).to_lowercase(),
                            f.preflight.len().to_string(),
                            if f.stats.tested { "yes" } else { "no" }.to_owned(),
                        ]
                    })
                    .collect::<Vec<_>>();
                print_table(
                    &[
                        "ID",
                        "SERVICE",
                        "VERSION",
                        "STATE",
                        "TRANSPORT",
                        "PREFLIGHTS",
                        "TESTED",
                    ],
                    &rows,
                );
            }
        }
        FlowsCommand::Show { flow } => {
            print_json(&find(&store, &flow).await?.flow.redacted())?;
        }
        FlowsCommand::Import { file, service } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let mut flow = Flow::from_json(&text)?;
            if let Some(service) = service {
                flow.service = service;
            }
            let secrets = flow.literal_secrets();
            if !secrets.is_empty() {
                eprintln!(
                    "warning: header(s) {} hold a literal credential; prefer {{{{session.…}}}} references",
                    secrets.join(", ")
                );
            }
            let saved = store
                .import_flow(flow.clone(), config.allowed_origins(&flow.service))
                .await?;
            println!(
                "imported flow {} for `{}` (version {})",
                saved.id, saved.service, saved.version
            );
        }
        FlowsCommand::Export { flow, out } => {
            let stored = find(&store, &flow).await?;
            let path = out.unwrap_or_else(|| {
                PathBuf::from("flows").join(format!("{}.json", stored.flow.service))
            });
            let json = serde_json::to_string_pretty(&stored.flow.redacted())? + "\n";
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, json)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
        FlowsCommand::Delete { flow } => {
            let deleted = store.delete_flow(&flow).await?;
            println!(
                "deleted flow {} ({})",
                deleted.flow.id, deleted.flow.service
            );
        }
    }
    store.close().await;
    Ok(())
}
