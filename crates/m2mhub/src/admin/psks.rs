//! `m2mhub device psk …`: DTLS pre-shared keys of CoAPS devices. The key is
//! printed once, by `issue` and `rotate`; `list` never shows it.

use super::{enc, show, table, text, time_text};
use crate::client::ApiClient;
use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand, Debug)]
pub enum PskCmd {
    /// Issue a pre-shared key for DTLS (CoAPS); the key is printed once.
    Issue {
        id: String,
        /// The PSK identity the device sends (default: the device id).
        #[arg(long)]
        identity: Option<String>,
        /// Days until it expires (default: never).
        #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=36_500))]
        expires_in_days: Option<u32>,
        /// A key the device already has (factory-provisioned), as hex, 16
        /// to 64 bytes (default: a new random 16-byte key).
        #[arg(long, value_name = "HEX")]
        key_hex: Option<String>,
    },
    /// A device's pre-shared keys (never the keys themselves).
    List { id: String },
    /// Replace a key: a new PSK with the same identity; the old key stops
    /// working at once. The new key is printed once.
    Rotate { id: String, psk_id: String },
    /// Revoke a pre-shared key: DTLS sessions using it end.
    Revoke { id: String, psk_id: String },
}

fn print_key(v: &Value, what: &str) {
    println!("{what} {}", text(&v["id"]));
    println!("identity:  {}", text(&v["identity"]));
    println!("key (hex): {}", text(&v["key_hex"]));
    let expires = match &v["expires_ms"] {
        Value::Null => "never".to_string(),
        e => time_text(e),
    };
    println!("expires:   {expires}");
    println!(
        "(shown once: configure the device's DTLS client with this identity and key; \
         m2mhub keeps it only encrypted)"
    );
}

pub(super) async fn psk(c: &ApiClient, j: bool, cmd: PskCmd) -> Result<()> {
    match cmd {
        PskCmd::Issue {
            id,
            identity,
            expires_in_days,
            key_hex,
        } => {
            let mut body = json!({"identity": identity, "expires_in_days": expires_in_days});
            if let Some(k) = key_hex {
                body["key_hex"] = json!(k);
            }
            let v = c
                .post(&format!("/api/v1/devices/{}/psks", enc(&id)), &body)
                .await?
                .ok()?;
            if j {
                show(&v, true);
            } else {
                print_key(&v, &format!("issued PSK of {id}:"));
            }
        }
        PskCmd::List { id } => {
            let mut v = c
                .get(&format!("/api/v1/devices/{}/psks", enc(&id)))
                .await?
                .ok()?;
            if !j {
                if let Some(items) = v["items"].as_array_mut() {
                    for it in items {
                        for k in ["created_ms", "expires_ms", "last_used_ms"] {
                            it[k] = json!(time_text(&it[k]));
                        }
                    }
                }
            }
            table(
                &v,
                j,
                &[
                    "id",
                    "identity",
                    "created_ms",
                    "expires_ms",
                    "revoked",
                    "replaced_by",
                    "last_used_ms",
                ],
            );
        }
        PskCmd::Rotate { id, psk_id } => {
            let v = c
                .post(
                    &format!("/api/v1/devices/{}/psks/{}/rotate", enc(&id), enc(&psk_id)),
                    &json!({}),
                )
                .await?
                .ok()?;
            if j {
                show(&v, true);
            } else {
                print_key(&v, &format!("rotated {psk_id} of {id}; the new PSK is"));
            }
        }
        PskCmd::Revoke { id, psk_id } => {
            c.delete(&format!(
                "/api/v1/devices/{}/psks/{}",
                enc(&id),
                enc(&psk_id)
            ))
            .await?
            .ok()?;
            if !j {
                println!("revoked PSK {psk_id} of {id}: its key no longer works");
            }
        }
    }
    Ok(())
}
