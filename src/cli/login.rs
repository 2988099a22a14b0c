//! `computetower login ACCOUNT`: a browser login now, its session stored sealed.

use super::{CliResult, print_json};
use crate::browser::BrowserPool;
use crate::config::Config;
use crate::renew::{RenewError, Renewer};

pub async fn run(account: &str, json: bool, config: &Config) -> CliResult {
    let store = crate::server::open_store(config).await?;
    let account = store.account(account).await?;
    let pool = BrowserPool::new(crate::server::browser_config(config));
    let renewer = Renewer::new(pool.clone(), store.clone());
    eprintln!(
        "==> logging in to {} as account {} …",
        account.url, account.id
    );
    let result = renewer.renew(&account, None).await;
    pool.shutdown().await;
    store.close().await;
    let renewed = match result {
        Ok(renewed) => renewed,
        Err(RenewError::Login { source, .. }) => {
            let shot = source
                .screenshot()
                .map(|p| format!(" (screenshot: {})", p.display()))
                .unwrap_or_default();
            return Err(format!("login failed: {source}{shot}").into());
        }
        Err(e) => return Err(e.into()),
    };
    let summary = crate::store::sessions::SessionSummary::from(&renewed.session);
    let outcome = renewed.outcome.as_ref();
    if json {
        print_json(&serde_json::json!({
            "account_id": account.id,
            "session": summary,
            "pages": outcome.map(|o| o.page_kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>()),
            "elapsed_ms": outcome.map(|o| o.elapsed.as_millis() as u64),
        }))?;
    } else {
        if let Some(o) = outcome {
            let pages: Vec<&str> = o.page_kinds.iter().map(|k| k.as_str()).collect();
            println!(
                "logged in in {} ms ({})",
                o.elapsed.as_millis(),
                pages.join(" → ")
            );
        }
        println!(
            "session {}: {} cookies ({}), {} localStorage keys, expires {}",
            summary.id,
            summary.cookies.len(),
            summary.cookies.join(", "),
            summary.local_storage.len(),
            summary
                .expires_at
                .map_or("with the browser session".to_owned(), |e| format!(
                    "at unix {e}"
                ))
        );
    }
    Ok(())
}
