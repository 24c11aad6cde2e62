//! The compiled plan: what a rule is once its SQL has been checked. Field
//! paths are resolved to indexes, aggregates to slots, durations to
//! milliseconds and polygons to parsed rings, so evaluation never looks at
//! the SQL syntax tree again.

use std::sync::Arc;

use crate::aggregate::AggFunc;
use crate::geo::Polygon;
use crate::topic::TopicFilter;
use crate::value::Val;

/// What kind of rule a plan is; decides which clauses the runtime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// No GROUP BY: WHERE decides per message (with optional FOR).
    Filter,
    /// GROUP BY with a window: HAVING decides per window result.
    Windowed,
    /// `HAVING silent(d)`: fires when a group has sent nothing for `d`.
    Silence,
}

/// A payload field path (`payload.engine.temp` → `["engine", "temp"]`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldPath {
    pub(crate) segments: Box<[Box<str>]>,
    /// Dotted name, for error messages.
    pub(crate) name: Arc<str>,
}

/// A window of GROUP BY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowSpec {
    /// Windows `[k·size, (k+1)·size)`, aligned to the epoch.
    Tumbling { size: i64 },
    /// Windows of `size` ending at every multiple of `hop`.
    Hopping { size: i64, hop: i64 },
    /// The last `size` before each message.
    Sliding { size: i64 },
}

/// One aggregate computed per window.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AggSpec {
    pub(crate) func: AggFunc,
    /// `None` for `count(*)`.
    pub(crate) arg: Option<Expr>,
}

/// One `arg FOR ms` of the rule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TimerSpec {
    pub(crate) arg: Expr,
    pub(crate) ms: i64,
}

/// One `zscore(arg, samples)` of the rule.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ZscoreSpec {
    pub(crate) arg: Expr,
    pub(crate) samples: f64,
    /// Over window results (group scope) rather than messages.
    pub(crate) over_groups: bool,
}

/// An output column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Column {
    /// `*`: the payload's members.
    Star,
    Expr {
        name: Arc<str>,
        expr: Expr,
    },
}

/// Binary arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
}

/// Comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// Scalar functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    Abs,
    Round,
    Floor,
    Ceil,
    Sqrt,
    Pow,
    Exp,
    Ln,
    Log10,
    Least,
    Greatest,
    Coalesce,
    Lower,
    Upper,
    Concat,
    Length,
    Distance,
}

/// A compiled expression.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr {
    Lit(Val<'static>),
    /// A payload field, by index into `Plan::fields`.
    Field(usize),
    /// The whole payload.
    Payload,
    Topic,
    /// A topic level, 0-based.
    TopicSegment(usize),
    Device,
    /// The message time; in a grouped rule, the evaluation time (window end).
    Ts,
    /// A GROUP BY key's value (grouped rules).
    Key(usize),
    /// An aggregate's value (grouped rules).
    Agg(usize),
    WindowStart,
    WindowEnd,
    /// Time of the last message (silence rules).
    LastSeen,
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Arith(Arith, Box<Expr>, Box<Expr>),
    Cmp(Cmp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    IsNull {
        arg: Box<Expr>,
        negated: bool,
    },
    Between {
        arg: Box<Expr>,
        low: Box<Expr>,
        high: Box<Expr>,
        negated: bool,
    },
    InList {
        arg: Box<Expr>,
        list: Vec<Expr>,
        negated: bool,
    },
    Case {
        operand: Option<Box<Expr>>,
        whens: Vec<(Expr, Expr)>,
        otherwise: Option<Box<Expr>>,
    },
    Call(Func, Vec<Expr>),
    Inside {
        lat: Box<Expr>,
        lon: Box<Expr>,
        polygon: Arc<Polygon>,
    },
    /// `zscore(…)`: the score its baseline slot computed for the current
    /// message or window (see `Plan::zscores`).
    Zscore {
        slot: usize,
    },
    /// `… FOR ms`: true once its operand (`Plan::timers[slot]`) has held
    /// for `ms`; the timer is updated before evaluation.
    For {
        slot: usize,
        ms: i64,
    },
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) kind: RuleKind,
    pub(crate) source: TopicFilter,
    pub(crate) fields: Vec<FieldPath>,
    pub(crate) columns: Vec<Column>,
    /// Per-message filter (grouped and silence rules); for filter rules the
    /// WHERE is the `condition`.
    pub(crate) filter: Option<Expr>,
    /// GROUP BY keys (message context).
    pub(crate) keys: Vec<Expr>,
    /// Index of the key that is `device`, if any.
    pub(crate) device_key: Option<usize>,
    pub(crate) window: Option<WindowSpec>,
    pub(crate) aggs: Vec<AggSpec>,
    /// The firing condition: WHERE of a filter rule, HAVING of a grouped one.
    pub(crate) condition: Option<Expr>,
    /// `CLEAR WHEN`: when present, an active rule clears only when it holds.
    pub(crate) clear: Option<Expr>,
    /// FOR operands and durations by timer slot, updated once per
    /// evaluation before anything reads them (so a short-circuited `AND`
    /// cannot stop a timer).
    pub(crate) timers: Vec<TimerSpec>,
    /// Timer slots used by `clear`, reset when the rule fires.
    pub(crate) clear_timers: std::ops::Range<usize>,
    /// zscore baselines by slot, updated once per message (or per window
    /// result for those over aggregates) before anything is evaluated.
    pub(crate) zscores: Vec<ZscoreSpec>,
    /// `silent(d)`.
    pub(crate) silence_ms: Option<i64>,
}
