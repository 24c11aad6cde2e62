//! Run-time values. Strings and JSON sub-trees borrow from the message
//! being evaluated (`Cow::Borrowed`), so evaluating a condition over a
//! payload allocates nothing; values kept across messages (cached window
//! results, `first`/`last`) are turned into owned `Val<'static>`.

use std::borrow::Cow;

/// A value of the rule language.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val<'a> {
    Null,
    Bool(bool),
    Num(f64),
    Str(Cow<'a, str>),
    /// An array or object from the payload.
    Json(Cow<'a, serde_json::Value>),
}

impl<'a> Val<'a> {
    /// A payload value, borrowed.
    pub(crate) fn from_json(v: &'a serde_json::Value) -> Val<'a> {
        match v {
            serde_json::Value::Null => Val::Null,
            serde_json::Value::Bool(b) => Val::Bool(*b),
            serde_json::Value::Number(n) => n.as_f64().map_or(Val::Null, Val::Num),
            serde_json::Value::String(s) => Val::Str(Cow::Borrowed(s)),
            other => Val::Json(Cow::Borrowed(other)),
        }
    }

    /// The type's name, for error messages.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Num(_) => "a number",
            Val::Str(_) => "a string",
            Val::Json(v) if v.is_array() => "an array",
            Val::Json(_) => "an object",
        }
    }

    pub(crate) fn into_owned(self) -> Val<'static> {
        match self {
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(b),
            Val::Num(n) => Val::Num(n),
            Val::Str(s) => Val::Str(Cow::Owned(s.into_owned())),
            Val::Json(v) => Val::Json(Cow::Owned(v.into_owned())),
        }
    }

    /// A borrowed view of an owned value (no copy of strings).
    pub(crate) fn view(v: &'a Val<'_>) -> Val<'a> {
        match v {
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(*b),
            Val::Num(n) => Val::Num(*n),
            Val::Str(s) => Val::Str(Cow::Borrowed(s.as_ref())),
            Val::Json(j) => Val::Json(Cow::Borrowed(j.as_ref())),
        }
    }

    /// As JSON for an output row. Integral numbers become JSON integers
    /// (a count of 3 is `3`, not `3.0`); infinities and NaN become null.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Val::Null => serde_json::Value::Null,
            Val::Bool(b) => serde_json::Value::Bool(*b),
            Val::Num(n) => number_to_json(*n),
            Val::Str(s) => serde_json::Value::String(s.to_string()),
            Val::Json(v) => v.as_ref().clone(),
        }
    }

    /// Truth for conditions: only `true` is true (null and false are not).
    pub(crate) fn is_true(&self) -> bool {
        matches!(self, Val::Bool(true))
    }
}

/// A number as JSON, integral values as integers.
pub(crate) fn number_to_json(n: f64) -> serde_json::Value {
    // 2^53: every integer below is exact in an f64.
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        serde_json::Value::from(n as i64)
    } else {
        serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, serde_json::Value::Number)
    }
}

/// Static types known at creation; `Any` is a payload field, whose type
/// only the message knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ty {
    Any,
    Null,
    Bool,
    Num,
    Str,
}

impl Ty {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Ty::Any => "a value",
            Ty::Null => "null",
            Ty::Bool => "a boolean",
            Ty::Num => "a number",
            Ty::Str => "a string",
        }
    }

    /// Whether a value of this type can be used where `want` is needed.
    pub(crate) fn fits(self, want: Ty) -> bool {
        self == want || matches!(self, Ty::Any | Ty::Null) || want == Ty::Any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers() {
        assert_eq!(Val::Num(3.0).to_json(), serde_json::json!(3));
        assert_eq!(Val::Num(2.5).to_json(), serde_json::json!(2.5));
        assert_eq!(Val::Num(f64::INFINITY).to_json(), serde_json::Value::Null);
        assert_eq!(Val::Num(1e300).to_json(), serde_json::json!(1e300));
    }
}
