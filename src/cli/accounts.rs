//! `computetower account …`

use std::io::BufRead;
use std::path::PathBuf;

use clap::Subcommand;

use super::{CliResult, print_json, print_table};
use crate::config::Config;
use crate::store::accounts::{AccountUpdate, NewAccount};

#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Add an account. NAME (default: derived from the host) is the model id clients use.
    Add {
        #[arg(long)]
        url: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        email: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long, requires = "email")]
        password_stdin: bool,
        /// Cookie file: browser-extension JSON, Netscape cookies.txt, or Playwright storageState.
        #[arg(long, value_name = "FILE")]
        cookies: Option<PathBuf>,
        /// Proxy for this account's traffic (http://, https:// or socks5://).
        #[arg(long)]
        proxy: Option<String>,
    },
    /// List accounts (no secrets are shown).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Change an account (by id, or by service name when it has one account).
    Update {
        account: String,
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        password_stdin: bool,
        #[arg(long, value_name = "FILE")]
        cookies: Option<PathBuf>,
        /// New proxy; an empty string removes it.
        #[arg(long)]
        proxy: Option<String>,
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
    /// Remove an account and its sessions.
    Remove { account: String },
}

fn read_password() -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err("--password-stdin: standard input held no password".into());
    }
    Ok(password)
}

fn read_cookie_file(path: &PathBuf) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read cookie file {}: {e}", path.display()).into())
}

pub async fn run(cmd: AccountCommand, config: &Config) -> CliResult {
    let store = crate::server::open_store(config).await?;
    match cmd {
        AccountCommand::Add {
            url,
            name,
            email,
            password_stdin,
            cookies,
            proxy,
        } => {
            // A bad URL (credentials in it, say) is told as such before anything else.
            crate::store::accounts::parse_site_url(&url)?;
            if name.is_none()
                && let Some(host) = crate::api::admin::unnamed_host(&url)
            {
                return Err(format!(
                    "{host} has no name to call the model by: give one with `--name` (the model \
                     id clients ask for), e.g. `--name local-chat`"
                )
                .into());
            }
            // Read every input before writing anything, so a bad file stores nothing.
            let password = password_stdin.then(read_password).transpose()?;
            let cookies = cookies.as_ref().map(read_cookie_file).transpose()?;
            if let Some(text) = &cookies {
                let site = crate::store::accounts::parse_site_url(&url)?;
                crate::session::SessionData::import(text, &site)?;
            }
            let account = store
                .add_account(NewAccount {
                    url,
                    service: name,
                    email,
                    password,
                    proxy,
                })
                .await?;
            if let Some(text) = cookies {
                store.import_session(&account, &text).await?;
            }
            println!("added account {} (model `{}`)", account.id, account.service);
        }
        AccountCommand::List { json } => {
            let accounts = store.accounts().await?;
            if json {
                print_json(&accounts)?;
            } else {
                let sessions = store.sessions().await?;
                let rows = accounts
                    .iter()
                    .map(|a| {
                        let session = sessions.iter().rev().find(|s| s.account_id == a.id).map_or(
                            "none".to_owned(),
                            |s| {
                                if s.authenticated {
                                    s.source.clone()
                                } else {
                                    "rejected".to_owned()
                                }
                            },
                        );
                        vec![
                            a.id.clone(),
                            a.service.clone(),
                            a.url.clone(),
                            a.email.clone().unwrap_or_default(),
                            if a.has_password { "set" } else { "-" }.to_owned(),
                            session,
                            if a.enabled { "yes" } else { "no" }.to_owned(),
                        ]
                    })
                    .collect::<Vec<_>>();
                print_table(
                    &[
                        "ID", "MODEL", "URL", "EMAIL", "PASSWORD", "SESSION", "ENABLED",
                    ],
                    &rows,
                );
            }
        }
        AccountCommand::Update {
            account,
            url,
            name,
            email,
            password_stdin,
            cookies,
            proxy,
            enable,
            disable,
        } => {
            let password = password_stdin.then(read_password).transpose()?;
            let cookies = cookies.as_ref().map(read_cookie_file).transpose()?;
            let current = super::find_account(&store, &account).await?;
            if let Some(text) = cookies {
                store.import_session(&current, &text).await?;
            }
            let enabled = match (enable, disable) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let updated = store
                .update_account(
                    &current.id,
                    AccountUpdate {
                        url,
                        service: name,
                        email,
                        password,
                        proxy,
                        enabled,
                    },
                )
                .await?;
            println!("updated account {}", updated.id);
        }
        AccountCommand::Remove { account } => {
            let account = super::find_account(&store, &account).await?;
            let removed = store.remove_account(&account.id).await?;
            println!("removed account {} ({})", removed.id, removed.service);
        }
    }
    store.close().await;
    Ok(())
}
