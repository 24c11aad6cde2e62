//! SenML (RFC 8428) packs, JSON or CBOR, resolved into points.
//!
//! Both representations decode to the same [`Node`] tree; labels are
//! recognised by their JSON name or their CBOR integer (RFC 8428 Table 4),
//! so one resolver serves both. Base name, base time and base value carry
//! over to later records until redefined (§4.1); base unit, base sum,
//! units, sums and update times are ignored.

use crate::{secs_to_ms, DecodeError, Key, Limits, Node, Out, Value};

/// Times below 2^28 seconds are relative to "now" (RFC 8428 §4.5.3).
const RELATIVE_LIMIT: f64 = 268_435_456.0;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Label {
    Bn,
    Bt,
    Bu,
    Bv,
    Bs,
    Bver,
    N,
    U,
    V,
    Vs,
    Vb,
    Vd,
    S,
    T,
    Ut,
    /// An unregistered label ending in `_` that we must not ignore (§4.4).
    MustUnderstand,
    Unknown,
}

pub(crate) fn label(key: &Key) -> Label {
    use Label::*;
    match key {
        Key::Text(s) => match s.as_str() {
            "bn" => Bn,
            "bt" => Bt,
            "bu" => Bu,
            "bv" => Bv,
            "bs" => Bs,
            "bver" => Bver,
            "n" => N,
            "u" => U,
            "v" => V,
            "vs" => Vs,
            "vb" => Vb,
            "vd" => Vd,
            "s" => S,
            "t" => T,
            "ut" => Ut,
            s if s.ends_with('_') => MustUnderstand,
            _ => Unknown,
        },
        Key::Int(i) => match i {
            -1 => Bver,
            -2 => Bn,
            -3 => Bt,
            -4 => Bu,
            -5 => Bv,
            -6 => Bs,
            0 => N,
            1 => U,
            2 => V,
            3 => Vs,
            4 => Vb,
            5 => S,
            6 => T,
            7 => Ut,
            8 => Vd,
            _ => Unknown,
        },
    }
}

/// Sniffing: a non-empty array of maps using only SenML labels, at least
/// one of them a name or a value.
pub(crate) fn looks_like_pack(node: &Node) -> bool {
    let Node::Array(records) = node else {
        return false;
    };
    let mut identifying = false;
    let all_senml = records.iter().all(|r| match r {
        Node::Map(entries) => entries.iter().all(|(k, _)| {
            let l = label(k);
            identifying |= matches!(l, Label::N | Label::Bn | Label::V | Label::Vs | Label::Vb);
            !matches!(l, Label::Unknown | Label::MustUnderstand)
        }),
        _ => false,
    });
    !records.is_empty() && all_senml && identifying
}

fn invalid(msg: impl Into<String>) -> DecodeError {
    DecodeError::InvalidSenml(msg.into())
}

fn number(node: &Node, field: &str) -> Result<f64, DecodeError> {
    node.as_f64()
        .ok_or_else(|| invalid(format!("{field} must be a number")))
}

fn text<'a>(node: &'a Node, field: &str) -> Result<&'a str, DecodeError> {
    match node {
        Node::Str(s) => Ok(s),
        _ => Err(invalid(format!("{field} must be a string"))),
    }
}

pub(crate) fn resolve(
    pack: Node,
    arrival_ms: i64,
    limits: &Limits,
    out: &mut Out,
) -> Result<(), DecodeError> {
    let Node::Array(records) = pack else {
        return Err(invalid("a pack must be an array of records"));
    };
    let (mut bn, mut bt, mut bv) = (String::new(), 0.0f64, 0.0f64);
    for (i, record) in records.into_iter().enumerate() {
        let Node::Map(entries) = record else {
            return Err(invalid(format!("record {i} is not a map")));
        };
        let (mut n, mut t) = ("", 0.0f64);
        let mut value: Option<Option<Value>> = None;
        let mut set_value = |v: Option<Value>| {
            if value.replace(v).is_some() {
                Err(invalid(format!("record {i} has more than one value field")))
            } else {
                Ok(())
            }
        };
        for (key, node) in &entries {
            match label(key) {
                Label::Bn => bn = text(node, "bn")?.to_owned(),
                Label::Bt => bt = number(node, "bt")?,
                Label::Bv => bv = number(node, "bv")?,
                Label::N => n = text(node, "n")?,
                Label::T => t = number(node, "t")?,
                Label::V => set_value(Some(Value::F64(number(node, "v")?)))?,
                Label::Vs => set_value(Some(Value::Str(text(node, "vs")?.to_owned())))?,
                Label::Vb => match node {
                    Node::Bool(b) => set_value(Some(Value::Bool(*b)))?,
                    _ => return Err(invalid("vb must be a boolean")),
                },
                // Data values have no point representation: record skipped.
                Label::Vd => set_value(None)?,
                Label::MustUnderstand => {
                    return Err(invalid(format!(
                        "record {i} has an unsupported must-understand field"
                    )))
                }
                Label::Bu | Label::Bs | Label::Bver | Label::U | Label::S | Label::Ut => {}
                Label::Unknown => {}
            }
        }
        let Some(Some(mut value)) = value else {
            continue;
        };
        if let Value::F64(v) = &mut value {
            *v += bv;
        }
        let name = format!("{bn}{n}");
        if name.is_empty() {
            return Err(invalid(format!("record {i} has no name")));
        }
        let time = bt + t;
        if !time.is_finite() {
            return Err(DecodeError::BadTimestamp(format!(
                "record {i} time is not finite"
            )));
        }
        let ts_ms = if time < RELATIVE_LIMIT {
            arrival_ms
                .checked_add(secs_to_ms(time)?)
                .ok_or_else(|| DecodeError::BadTimestamp("relative time overflows".into()))?
        } else {
            secs_to_ms(time)?
        };
        out.push(name, ts_ms, value, limits)?;
    }
    Ok(())
}
