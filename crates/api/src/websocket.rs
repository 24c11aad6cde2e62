//! MQTT over WebSocket (`/mqtt`, subprotocol `mqtt`).
//!
//! The WebSocket is bridged to an in-memory duplex pipe whose other end is
//! served by the broker like any TCP connection; binary frames carry the MQTT
//! byte stream and may split or join packets freely, as the spec allows.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use m2mhub_broker::Broker;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PIPE: usize = 64 * 1024;

pub(crate) async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<crate::state::AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let broker = state.broker.clone();
    let max = broker.config().max_packet_size as usize + 8;
    ws.protocols(["mqtt"])
        .max_message_size(max)
        .on_upgrade(move |socket| bridge(socket, broker, peer))
}

async fn bridge(socket: WebSocket, broker: Broker, peer: SocketAddr) {
    let (broker_side, ours) = tokio::io::duplex(PIPE);
    let (mut pipe_rx, mut pipe_tx) = tokio::io::split(ours);
    let (mut ws_tx, mut ws_rx) = socket.split();
    let inbound = async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                // Text frames are not allowed for MQTT; ping/pong are handled by axum.
                Message::Text(_) => break,
                _ => continue,
            };
            if pipe_tx.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = pipe_tx.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; PIPE];
        loop {
            match pipe_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                    if ws_tx.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    let serve = broker.serve_connection(broker_side, peer, "ws", None);
    tokio::join!(serve, async {
        tokio::select! {
            _ = inbound => {},
            _ = outbound => {},
        }
    });
}
