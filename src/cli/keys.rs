//! `computetower keys …`

use clap::Subcommand;

use super::{CliResult, print_json, print_table};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key; it is printed once and only its hash is kept.
    Create {
        /// The key may also use /admin.
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        name: Option<String>,
    },
    /// List keys (prefixes only).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id.
    Revoke { id: String },
}

pub async fn run(cmd: KeysCommand, config: &Config) -> CliResult {
    let store = crate::server::open_store(config).await?;
    match cmd {
        KeysCommand::Create { admin, name } => {
            let (info, key) = store.create_key(admin, name).await?;
            eprintln!(
                "created {}key {} — store it now, it is not shown again:",
                if info.admin { "admin " } else { "" },
                info.id
            );
            println!("{key}");
        }
        KeysCommand::List { json } => {
            let keys = store.keys().await?;
            if json {
                print_json(&keys)?;
            } else {
                let rows = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            format!("{}…", k.prefix),
                            if k.admin { "admin" } else { "api" }.to_owned(),
                            k.name.clone().unwrap_or_default(),
                            if k.revoked_at.is_some() {
                                "revoked"
                            } else {
                                "live"
                            }
                            .to_owned(),
                        ]
                    })
                    .collect::<Vec<_>>();
                print_table(&["ID", "KEY", "SCOPE", "NAME", "STATE"], &rows);
            }
        }
        KeysCommand::Revoke { id } => {
            store.revoke_key(&id).await?;
            println!("revoked {id}");
        }
    }
    store.close().await;
    Ok(())
}
