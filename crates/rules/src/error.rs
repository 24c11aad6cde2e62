//! Errors, split by when they happen: a [`CompileError`] refuses a rule at
//! creation (with the position in the rule text, so an API or a CLI can
//! point at it), an [`EvalError`] is one message's failure at run time,
//! counted in the rule's [`Counters`](crate::Counters) while the rule goes on.

use std::fmt;
use std::sync::Arc;

/// Where in the rule text an error was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1-based line.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
    /// Byte offset into the rule text (for underlining).
    pub offset: usize,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A rule refused at creation: where, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{position}: {kind}")]
pub struct CompileError {
    /// Where the problem is.
    pub position: Position,
    /// What the problem is.
    pub kind: CompileErrorKind,
}

/// Why a rule was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompileErrorKind {
    /// The text is not SQL the parser understands.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// Valid SQL, but not part of the rule language.
    #[error("not supported in rules: {0}")]
    Unsupported(String),
    /// A function the rule language does not have.
    #[error("unknown function `{0}`")]
    UnknownFunction(String),
    /// A known function called with the wrong number of arguments.
    #[error("`{function}` takes {expected}, found {found}")]
    WrongArity {
        /// The function's name.
        function: String,
        /// What it takes, in words ("1 argument", "2 to 3 arguments").
        expected: String,
        /// How many it was given.
        found: usize,
    },
    /// An aggregate in WHERE, which filters single messages.
    #[error("aggregate `{0}` in WHERE: WHERE filters single messages, put conditions on aggregates in HAVING")]
    AggregateInWhere(String),
    /// An aggregate where none can be (nested, in GROUP BY, in a rule without GROUP BY).
    #[error("aggregate `{function}` {reason}")]
    MisplacedAggregate {
        /// The aggregate's name.
        function: String,
        /// Why it cannot be there.
        reason: &'static str,
    },
    /// HAVING in a rule without GROUP BY.
    #[error("HAVING needs GROUP BY (e.g. GROUP BY device, TUMBLING(10s))")]
    HavingWithoutGroupBy,
    /// A per-message value used where only groups exist.
    #[error("`{0}` must appear in GROUP BY or inside an aggregate")]
    NotGrouped(String),
    /// A duration that does not parse or is out of range.
    #[error("bad duration `{text}`: {reason}")]
    BadDuration {
        /// The duration as written.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A polygon literal that does not parse or is not a valid ring.
    #[error("bad polygon: {0}")]
    BadPolygon(String),
    /// A FROM topic filter that is not a valid MQTT filter.
    #[error("bad topic filter `{filter}`: {reason}")]
    BadTopicFilter {
        /// The filter as written.
        filter: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value of the wrong type where the type is known at creation.
    #[error("type error: {0}")]
    Type(String),
    /// A construct of the rule language used where it has no meaning
    /// (FOR outside a firing condition, a window outside GROUP BY, …).
    #[error("{0}")]
    Misplaced(String),
}

/// Why one message (or one window) failed to evaluate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The payload has no value at a referenced field path.
    #[error("missing field `{0}`")]
    MissingField(Arc<str>),
    /// An operator or function got a value of the wrong type.
    #[error("`{op}` needs {expected}, found {found}")]
    WrongType {
        /// The operator or function.
        op: &'static str,
        /// The type it needs.
        expected: &'static str,
        /// The type it got.
        found: &'static str,
    },
    /// Two values that cannot be ordered against each other.
    #[error("cannot compare {left} with {right}")]
    Incomparable {
        /// Left type.
        left: &'static str,
        /// Right type.
        right: &'static str,
    },
    /// `/` or `%` by zero.
    #[error("division by zero")]
    DivisionByZero,
    /// A timestamp too far from the epoch for window arithmetic.
    #[error("timestamp {0} ms is out of range (more than ±{max} ms from the epoch)", max = crate::rule::MAX_TS)]
    TimestampOutOfRange(i64),
    /// The rule already tracks its maximum number of keys (devices or groups).
    #[error("too many keys: the rule tracks at most {0}")]
    TooManyKeys(usize),
}

/// Line/column ↔ byte offset conversions over the rule text.
pub(crate) struct SourceMap<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        SourceMap { text, line_starts }
    }

    /// The position of a sqlparser location (1-based line and column in
    /// characters); line 0 (unknown) maps to the end of the text.
    pub(crate) fn position(&self, line: u64, column: u64) -> Position {
        if line == 0 || line as usize > self.line_starts.len() {
            return self.end();
        }
        let start = self.line_starts[line as usize - 1];
        let line_text = self.text[start..].split('\n').next().unwrap_or("");
        let col = column.max(1) as usize - 1;
        let offset = start
            + line_text
                .char_indices()
                .nth(col)
                .map(|(i, _)| i)
                .unwrap_or(line_text.len());
        Position {
            line: line as u32,
            column: column.max(1) as u32,
            offset,
        }
    }

    /// One past the last character.
    pub(crate) fn end(&self) -> Position {
        let line = self.line_starts.len();
        let start = self.line_starts[line - 1];
        Position {
            line: line as u32,
            column: self.text[start..].chars().count() as u32 + 1,
            offset: self.text.len(),
        }
    }
}
