//! The OpenAPI document, derived from the same table that builds the
//! router: a route cannot exist without being documented, because adding
//! it to the router *is* documenting it.

use axum::routing::MethodRouter;
use axum::Router;
use serde_json::{json, Map, Value};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// No credentials (health, login, device provisioning with a claim token).
    Public,
    Viewer,
    Operator,
    Admin,
    /// A device with its own credential (token as Bearer or Basic password,
    /// or its certificate over HTTPS), acting for itself only.
    Device,
}

impl Access {
    /// The machine-readable name, in the document's `x-access` field.
    pub fn name(self) -> &'static str {
        match self {
            Access::Public => "public",
            Access::Viewer => "viewer",
            Access::Operator => "operator",
            Access::Admin => "admin",
            Access::Device => "device",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Access::Public => "no authentication",
            Access::Viewer => "role viewer or above",
            Access::Operator => "role operator or above",
            Access::Admin => "role admin",
            Access::Device => "the device itself: its token as `Authorization: Bearer <secret>` or as the Basic password with the device id as user name, or its client certificate over HTTPS",
        }
    }
}

/// One documented operation.
#[derive(Debug, Clone)]
pub struct Operation {
    pub method: &'static str,
    /// Axum path syntax (`/devices/{id}`), which is also OpenAPI's.
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// A server-sent-events stream (`text/event-stream`) that does not end
    /// on its own.
    pub stream: bool,
}

/// Builds the router and the document together.
pub struct ApiBuilder<S> {
    router: Router<S>,
    ops: Vec<Operation>,
}

impl<S: Clone + Send + Sync + 'static> ApiBuilder<S> {
    pub fn new() -> Self {
        ApiBuilder {
            router: Router::new(),
            ops: Vec::new(),
        }
    }

    /// Add a route: `methods` is the `MethodRouter` (e.g. `get(h).post(h2)`),
    /// `docs` one `(method, summary, access)` per method it serves.
    pub fn route(
        self,
        path: &'static str,
        methods: MethodRouter<S>,
        docs: &[(&'static str, &'static str, Access)],
    ) -> Self {
        self.add(path, methods, docs, false)
    }

    /// Add a route that answers with a server-sent-events stream.
    pub fn stream(
        self,
        path: &'static str,
        methods: MethodRouter<S>,
        docs: &[(&'static str, &'static str, Access)],
    ) -> Self {
        self.add(path, methods, docs, true)
    }

    fn add(
        mut self,
        path: &'static str,
        methods: MethodRouter<S>,
        docs: &[(&'static str, &'static str, Access)],
        stream: bool,
    ) -> Self {
        self.router = self.router.route(path, methods);
        for (method, summary, access) in docs {
            self.ops.push(Operation {
                method,
                path,
                summary,
                access: *access,
                stream,
            });
        }
        self
    }

    pub fn finish(self) -> (Router<S>, Vec<Operation>) {
        (self.router, self.ops)
    }
}

impl<S: Clone + Send + Sync + 'static> Default for ApiBuilder<S> {
    fn default() -> Self {
        Self::new()
    }
}

/// Operations whose body is not JSON: firmware images, diagnostic bundles,
/// and device telemetry (any payload format MQTT takes).
const RAW_BODIES: [(&str, &str); 3] = [
    ("POST", "/ota/artifacts"),
    ("PUT", "/diagnostics/upload/{token}"),
    ("POST", "/devices/{id}/telemetry"),
];

/// What a write takes: the schemas of the bodies are not written down
/// yet, so any JSON value (or bytes) is declared. That is still worth
/// documenting: fuzzers (`scripts/schemathesis.sh`) then send every write
/// arbitrary bodies, and the server must answer each with a 4xx problem,
/// never a 5xx.
fn request_body(op: &Operation) -> Option<Value> {
    if !matches!(op.method, "POST" | "PUT" | "PATCH") {
        return None;
    }
    let raw = RAW_BODIES.contains(&(op.method, op.path));
    let content = if raw {
        json!({"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}})
    } else {
        json!({"application/json": {"schema": {}}})
    };
    Some(json!({"required": false, "content": content}))
}

/// The OpenAPI 3.1 document for `ops` (paths relative to `/api/v1`).
pub fn document(ops: &[Operation]) -> Value {
    let mut paths = Map::new();
    for op in ops {
        let entry = paths
            .entry(op.path.to_string())
            .or_insert_with(|| json!({}));
        let params: Vec<Value> = op
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut operation = json!({
            "summary": op.summary,
            "description": format!("Access: {}.", op.access.describe()),
            "x-access": op.access.name(),
            "parameters": params,
            "responses": {
                "2XX": {"description": "Success", "content": {"application/json": {}}},
                "default": {"description": "An RFC 9457 problem document", "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            }
        });
        if let Some(body) = request_body(op) {
            operation["requestBody"] = body;
        }
        if op.stream {
            operation["x-stream"] = json!(true);
            operation["responses"]["2XX"] = json!({"description": "A stream of server-sent events", "content": {"text/event-stream": {}}});
        }
        match op.access {
            Access::Public => {}
            Access::Device => {
                operation["security"] =
                    json!([{"deviceToken": []}, {"deviceBasic": []}, {"deviceCertificate": []}]);
            }
            _ => operation["security"] = json!([{"bearer": []}]),
        }
        if let Some(map) = entry.as_object_mut() {
            map.insert(op.method.to_ascii_lowercase(), operation);
        }
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "m2mhub API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Fleet, identity and data API of m2mhub. Errors are RFC 9457 problem documents. Authenticate with `Authorization: Bearer <API token>` (POST /auth/login returns one)."
        },
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "An operator's API token"},
                "deviceToken": {"type": "http", "scheme": "bearer", "description": "A device's token secret"},
                "deviceBasic": {"type": "http", "scheme": "basic", "description": "The device id as user name, its token secret as password"},
                "deviceCertificate": {"type": "mutualTLS", "description": "The device's client certificate, on the HTTPS listener"}
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"}
                    },
                    "required": ["type", "title", "status"]
                }
            }
        }
    })
}
