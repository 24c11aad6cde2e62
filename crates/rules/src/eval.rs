//! Evaluation of compiled expressions.
//!
//! A tree walk over [`Expr`] with SQL's three-valued logic: null
//! propagates through arithmetic and comparisons, `AND`/`OR` follow
//! Kleene logic, and a condition holds only when it is `true`. Values
//! borrow from the payload, the topic and the plan, so a condition over a
//! message allocates nothing. Errors (a missing field, a string where a
//! number is needed) abort the evaluation of this one message.
//!
//! Two pieces of state live outside the tree, per key, and are only read
//! here: FOR timers and zscore baselines. The rule updates them once per
//! message or window *before* evaluating (see [`update_timers`]), so a
//! short-circuited `AND` cannot skip an update. A clock tick re-checks a
//! condition without updating them: a FOR node then compares its timer's
//! start with the tick's time.

use std::borrow::Cow;
use std::cmp::Ordering;

use crate::anomaly::Baseline;
use crate::error::EvalError;
use crate::geo;
use crate::plan::{Arith, Cmp, Expr, FieldPath, Func, TimerSpec};
use crate::topic;
use crate::value::Val;

/// A FOR timer: since when its operand has held (`None`: it does not).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Timer {
    pub(crate) since: Option<i64>,
}

/// What an expression can see.
#[derive(Clone, Copy)]
pub(crate) struct Scope<'a> {
    pub(crate) fields: &'a [FieldPath],
    pub(crate) payload: Option<&'a serde_json::Value>,
    pub(crate) topic: &'a str,
    pub(crate) device: Option<&'a str>,
    /// Evaluation time: the message's, the window end, or the tick's.
    pub(crate) ts: i64,
    /// When a FOR timer starting now counts from (the window start for
    /// window results, else `ts`).
    pub(crate) since: i64,
    pub(crate) keys: &'a [Val<'static>],
    pub(crate) aggs: &'a [Val<'static>],
    pub(crate) window: Option<(i64, i64)>,
    pub(crate) last_seen: i64,
    pub(crate) baselines: &'a [Baseline],
    pub(crate) timers: &'a [Timer],
}

impl<'a> Scope<'a> {
    /// A message scope with nothing else.
    pub(crate) fn message(
        fields: &'a [FieldPath],
        payload: &'a serde_json::Value,
        topic: &'a str,
        device: Option<&'a str>,
        ts: i64,
    ) -> Scope<'a> {
        Scope {
            fields,
            payload: Some(payload),
            topic,
            device,
            ts,
            since: ts,
            keys: &[],
            aggs: &[],
            window: None,
            last_seen: ts,
            baselines: &[],
            timers: &[],
        }
    }
}

/// Evaluate `e`.
pub(crate) fn eval<'a>(e: &'a Expr, s: &Scope<'a>) -> Result<Val<'a>, EvalError> {
    Ok(match e {
        Expr::Lit(v) => Val::view(v),
        Expr::Field(i) => field(s, *i)?,
        Expr::Payload => s.payload.map_or(Val::Null, Val::from_json),
        Expr::Topic => Val::Str(Cow::Borrowed(s.topic)),
        Expr::TopicSegment(i) => {
            topic::segment(s.topic, *i).map_or(Val::Null, |x| Val::Str(Cow::Borrowed(x)))
        }
        Expr::Device => s.device.map_or(Val::Null, |d| Val::Str(Cow::Borrowed(d))),
        Expr::Ts => Val::Num(s.ts as f64),
        Expr::Key(i) => s.keys.get(*i).map_or(Val::Null, Val::view),
        Expr::Agg(i) => s.aggs.get(*i).map_or(Val::Null, Val::view),
        Expr::WindowStart => s.window.map_or(Val::Null, |w| Val::Num(w.0 as f64)),
        Expr::WindowEnd => s.window.map_or(Val::Null, |w| Val::Num(w.1 as f64)),
        Expr::LastSeen => Val::Num(s.last_seen as f64),
        Expr::Neg(a) => match eval(a, s)? {
            Val::Num(x) => Val::Num(-x),
            Val::Null => Val::Null,
            other => return Err(wrong("-", "a number", &other)),
        },
        Expr::Not(a) => match truth(eval(a, s)?, "NOT")? {
            Some(b) => Val::Bool(!b),
            None => Val::Null,
        },
        Expr::Arith(op, a, b) => {
            let x = eval(a, s)?;
            let y = eval(b, s)?;
            arith(*op, &x, &y)?
        }
        Expr::Cmp(op, a, b) => {
            let x = eval(a, s)?;
            let y = eval(b, s)?;
            compare(*op, &x, &y)?
        }
        Expr::And(a, b) => {
            let l = truth(eval(a, s)?, "AND")?;
            if l == Some(false) {
                return Ok(Val::Bool(false));
            }
            match (l, truth(eval(b, s)?, "AND")?) {
                (_, Some(false)) => Val::Bool(false),
                (Some(true), Some(true)) => Val::Bool(true),
                _ => Val::Null,
            }
        }
        Expr::Or(a, b) => {
            let l = truth(eval(a, s)?, "OR")?;
            if l == Some(true) {
                return Ok(Val::Bool(true));
            }
            match (l, truth(eval(b, s)?, "OR")?) {
                (_, Some(true)) => Val::Bool(true),
                (Some(false), Some(false)) => Val::Bool(false),
                _ => Val::Null,
            }
        }
        Expr::IsNull { arg, negated } => {
            let v = lenient(eval(arg, s))?;
            Val::Bool(matches!(v, Val::Null) != *negated)
        }
        Expr::Between {
            arg,
            low,
            high,
            negated,
        } => {
            let x = eval(arg, s)?;
            let lo = eval(low, s)?;
            let hi = eval(high, s)?;
            let a = truth(compare(Cmp::Ge, &x, &lo)?, "BETWEEN")?;
            let b = truth(compare(Cmp::Le, &x, &hi)?, "BETWEEN")?;
            match (a, b) {
                (Some(false), _) | (_, Some(false)) => Val::Bool(*negated),
                (Some(true), Some(true)) => Val::Bool(!*negated),
                _ => Val::Null,
            }
        }
        Expr::InList { arg, list, negated } => {
            let x = eval(arg, s)?;
            let mut unknown = matches!(x, Val::Null);
            let mut found = false;
            for item in list {
                match compare(Cmp::Eq, &x, &eval(item, s)?)? {
                    Val::Bool(true) => {
                        found = true;
                        break;
                    }
                    Val::Null => unknown = true,
                    _ => {}
                }
            }
            if found {
                Val::Bool(!*negated)
            } else if unknown {
                Val::Null
            } else {
                Val::Bool(*negated)
            }
        }
        Expr::Case {
            operand,
            whens,
            otherwise,
        } => {
            let operand = match operand {
                Some(o) => Some(eval(o, s)?),
                None => None,
            };
            for (cond, result) in whens {
                let c = eval(cond, s)?;
                let hit = match &operand {
                    Some(o) => compare(Cmp::Eq, o, &c)?.is_true(),
                    None => c.is_true(),
                };
                if hit {
                    return eval(result, s);
                }
            }
            match otherwise {
                Some(x) => eval(x, s)?,
                None => Val::Null,
            }
        }
        Expr::Call(f, args) => call(*f, args, s)?,
        Expr::Inside { lat, lon, polygon } => {
            let la = eval(lat, s)?;
            let lo = eval(lon, s)?;
            match (num(&la, "inside")?, num(&lo, "inside")?) {
                (Some(a), Some(b)) => Val::Bool(polygon.contains(a, b)),
                _ => Val::Null,
            }
        }
        Expr::Zscore { slot, .. } => s
            .baselines
            .get(*slot)
            .and_then(|b| b.last)
            .map_or(Val::Null, Val::Num),
        Expr::For { slot, ms } => Val::Bool(
            s.timers
                .get(*slot)
                .and_then(|t| t.since)
                .is_some_and(|since| s.ts - since >= *ms),
        ),
    })
}

/// Update the FOR timers from their operands: started at `s.since` when
/// the operand holds, stopped when it does not. All operands are evaluated
/// before any timer changes, so a failure leaves them untouched.
pub(crate) fn update_timers(
    specs: &[TimerSpec],
    s: &Scope<'_>,
    timers: &mut [Timer],
) -> Result<(), EvalError> {
    if specs.is_empty() {
        return Ok(());
    }
    // The compiler allows at most 64 FOR per rule: one bit each.
    let mut held = 0u64;
    for (i, spec) in specs.iter().enumerate().take(64) {
        if eval(&spec.arg, s)?.is_true() {
            held |= 1 << i;
        }
    }
    for (i, t) in timers.iter_mut().enumerate().take(specs.len().min(64)) {
        if held & (1 << i) != 0 {
            t.since.get_or_insert(s.since);
        } else {
            t.since = None;
        }
    }
    Ok(())
}

/// A missing field counts as null (IS NULL, coalesce).
fn lenient(r: Result<Val<'_>, EvalError>) -> Result<Val<'_>, EvalError> {
    match r {
        Err(EvalError::MissingField(_)) => Ok(Val::Null),
        other => other,
    }
}

fn field<'a>(s: &Scope<'a>, i: usize) -> Result<Val<'a>, EvalError> {
    let Some(path) = s.fields.get(i) else {
        return Ok(Val::Null);
    };
    let missing = || EvalError::MissingField(path.name.clone());
    let mut v = s.payload.ok_or_else(missing)?;
    for seg in path.segments.iter() {
        v = match v {
            serde_json::Value::Object(m) => m.get(&**seg),
            serde_json::Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(missing)?;
    }
    Ok(Val::from_json(v))
}

fn wrong(op: &'static str, expected: &'static str, found: &Val<'_>) -> EvalError {
    EvalError::WrongType {
        op,
        expected,
        found: found.type_name(),
    }
}

fn truth(v: Val<'_>, op: &'static str) -> Result<Option<bool>, EvalError> {
    match v {
        Val::Bool(b) => Ok(Some(b)),
        Val::Null => Ok(None),
        other => Err(wrong(op, "a condition (true/false)", &other)),
    }
}

fn num(v: &Val<'_>, op: &'static str) -> Result<Option<f64>, EvalError> {
    match v {
        Val::Num(x) => Ok(Some(*x)),
        Val::Null => Ok(None),
        other => Err(wrong(op, "a number", other)),
    }
}

fn arith_symbol(op: Arith) -> &'static str {
    match op {
        Arith::Add => "+",
        Arith::Sub => "-",
        Arith::Mul => "*",
        Arith::Div => "/",
        Arith::Mod => "%",
    }
}

fn arith(op: Arith, x: &Val<'_>, y: &Val<'_>) -> Result<Val<'static>, EvalError> {
    let sym = arith_symbol(op);
    let (Some(a), Some(b)) = (num(x, sym)?, num(y, sym)?) else {
        return Ok(Val::Null);
    };
    Ok(Val::Num(match op {
        Arith::Add => a + b,
        Arith::Sub => a - b,
        Arith::Mul => a * b,
        Arith::Div if b == 0.0 => return Err(EvalError::DivisionByZero),
        Arith::Div => a / b,
        Arith::Mod if b == 0.0 => return Err(EvalError::DivisionByZero),
        Arith::Mod => a % b,
    }))
}

/// Comparison. Values of different types are never equal; ordering them
/// is an error. Null compares to null (unknown).
pub(crate) fn compare(op: Cmp, a: &Val<'_>, b: &Val<'_>) -> Result<Val<'static>, EvalError> {
    let equality = matches!(op, Cmp::Eq | Cmp::Ne);
    let ord = match (a, b) {
        (Val::Null, _) | (_, Val::Null) => return Ok(Val::Null),
        (Val::Num(x), Val::Num(y)) => match x.partial_cmp(y) {
            Some(o) => o,
            None => return Ok(Val::Null),
        },
        (Val::Str(x), Val::Str(y)) => x.as_ref().cmp(y.as_ref()),
        (Val::Bool(x), Val::Bool(y)) if equality => x.cmp(y),
        (Val::Json(x), Val::Json(y)) if equality => {
            return Ok(Val::Bool((x == y) == (op == Cmp::Eq)));
        }
        _ if equality => return Ok(Val::Bool(op == Cmp::Ne)),
        _ => {
            return Err(EvalError::Incomparable {
                left: a.type_name(),
                right: b.type_name(),
            })
        }
    };
    Ok(Val::Bool(match op {
        Cmp::Eq => ord == Ordering::Equal,
        Cmp::Ne => ord != Ordering::Equal,
        Cmp::Lt => ord == Ordering::Less,
        Cmp::Le => ord != Ordering::Greater,
        Cmp::Gt => ord == Ordering::Greater,
        Cmp::Ge => ord != Ordering::Less,
    }))
}

fn func_name(f: Func) -> &'static str {
    match f {
        Func::Abs => "abs",
        Func::Round => "round",
        Func::Floor => "floor",
        Func::Ceil => "ceil",
        Func::Sqrt => "sqrt",
        Func::Pow => "pow",
        Func::Exp => "exp",
        Func::Ln => "ln",
        Func::Log10 => "log10",
        Func::Least => "least",
        Func::Greatest => "greatest",
        Func::Coalesce => "coalesce",
        Func::Lower => "lower",
        Func::Upper => "upper",
        Func::Concat => "concat",
        Func::Length => "length",
        Func::Distance => "distance",
    }
}

fn call<'a>(f: Func, args: &'a [Expr], s: &Scope<'a>) -> Result<Val<'a>, EvalError> {
    let name = func_name(f);
    // The compiler checked arity; a short list here is a bug, not input: null.
    let arg = |i: usize| -> Result<Val<'a>, EvalError> {
        match args.get(i) {
            Some(e) => eval(e, s),
            None => Ok(Val::Null),
        }
    };
    let unary = |g: fn(f64) -> f64| -> Result<Val<'a>, EvalError> {
        Ok(num(&arg(0)?, name)?.map_or(Val::Null, |x| Val::Num(g(x))))
    };
    Ok(match f {
        Func::Abs => unary(f64::abs)?,
        Func::Floor => unary(f64::floor)?,
        Func::Ceil => unary(f64::ceil)?,
        Func::Sqrt => unary(f64::sqrt)?,
        Func::Exp => unary(f64::exp)?,
        Func::Ln => unary(f64::ln)?,
        Func::Log10 => unary(f64::log10)?,
        Func::Round => {
            let x = num(&arg(0)?, name)?;
            let digits = if args.len() > 1 {
                num(&arg(1)?, name)?
            } else {
                Some(0.0)
            };
            match (x, digits) {
                (Some(x), Some(d)) => {
                    let p = 10f64.powi(d.clamp(-15.0, 15.0) as i32);
                    Val::Num((x * p).round() / p)
                }
                _ => Val::Null,
            }
        }
        Func::Pow => match (num(&arg(0)?, name)?, num(&arg(1)?, name)?) {
            (Some(a), Some(b)) => Val::Num(a.powf(b)),
            _ => Val::Null,
        },
        Func::Least | Func::Greatest => {
            let mut best: Option<f64> = None;
            for i in 0..args.len() {
                if let Some(x) = num(&arg(i)?, name)? {
                    best = Some(match best {
                        None => x,
                        Some(b) if f == Func::Least => b.min(x),
                        Some(b) => b.max(x),
                    });
                }
            }
            best.map_or(Val::Null, Val::Num)
        }
        Func::Coalesce => {
            for i in 0..args.len() {
                let v = lenient(arg(i))?;
                if !matches!(v, Val::Null) {
                    return Ok(v);
                }
            }
            Val::Null
        }
        Func::Lower | Func::Upper => match arg(0)? {
            Val::Str(x) if f == Func::Lower => Val::Str(Cow::Owned(x.to_lowercase())),
            Val::Str(x) => Val::Str(Cow::Owned(x.to_uppercase())),
            Val::Null => Val::Null,
            other => return Err(wrong(name, "a string", &other)),
        },
        Func::Length => match arg(0)? {
            Val::Str(x) => Val::Num(x.chars().count() as f64),
            Val::Null => Val::Null,
            other => return Err(wrong(name, "a string", &other)),
        },
        Func::Concat => {
            let mut out = String::new();
            for i in 0..args.len() {
                match arg(i)? {
                    Val::Null => {}
                    Val::Str(x) => out.push_str(&x),
                    Val::Bool(b) => out.push_str(if b { "true" } else { "false" }),
                    Val::Num(x) => out.push_str(&crate::value::number_to_json(x).to_string()),
                    Val::Json(j) => out.push_str(&j.to_string()),
                }
            }
            Val::Str(Cow::Owned(out))
        }
        Func::Distance => {
            let mut xs = [0.0; 4];
            for (i, slot) in xs.iter_mut().enumerate() {
                match num(&arg(i)?, name)? {
                    Some(x) => *slot = x,
                    None => return Ok(Val::Null),
                }
            }
            Val::Num(geo::distance_m(xs[0], xs[1], xs[2], xs[3]))
        }
    })
}
