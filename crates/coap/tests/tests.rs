//! Integration tests of the CoAP driver: the real UDP server on an
//! ephemeral loopback port, driven by a client built from the crate's own
//! sans-IO `Endpoint`, by raw datagrams, and by libcoap's `coap-client`
//! when it is installed.
//!
//! One test binary; the modules live in `tests/tests/`.

#[path = "tests/common.rs"]
mod common;

#[path = "tests/driver.rs"]
mod driver;
#[path = "tests/dtls.rs"]
mod dtls;
#[path = "tests/libcoap.rs"]
mod libcoap;
