//! Type-checking and compilation of a parsed rule into a [`Plan`].
//!
//! Everything that can be known before the first message is checked here,
//! so that a rule that is accepted only fails at run time on what a message
//! carries (a missing field, a string where a number was expected). Each
//! expression is compiled in a *scope*:
//!
//! * **message** scope (WHERE, GROUP BY keys, aggregate arguments, SELECT
//!   and WHERE of a rule without GROUP BY): payload fields, topic, device,
//!   `ts`; no aggregates;
//! * **group** scope (SELECT, HAVING and CLEAR WHEN of a grouped rule):
//!   aggregates, GROUP BY keys (an expression equal to a key compiles to
//!   that key), `ts`, `window_start`/`window_end`; a bare field is an error
//!   because a window has many values of it.
//!
//! `FOR` is allowed only in the condition that decides firing (WHERE of a
//! rule without GROUP BY, HAVING, CLEAR WHEN) and not nested in another FOR.

use std::sync::Arc;

use sqlparser::ast::{
    BinaryOperator, Expr as SqlExpr, Function, FunctionArg, FunctionArgExpr, FunctionArguments,
    GroupByExpr, Ident, ObjectNamePart, SelectFlavor, SelectItem, Spanned, TableFactor,
    UnaryOperator, Value,
};
use sqlparser::tokenizer::{Location, Span};

use crate::aggregate::AggFunc;
use crate::anomaly;
use crate::duration;
use crate::error::{CompileError, CompileErrorKind as K, Position, SourceMap};
use crate::geo::Polygon;
use crate::parse::{self, FOR_MARKER};
use crate::plan::{
    AggSpec, Arith, Cmp, Column, Expr, FieldPath, Func, Plan, RuleKind, TimerSpec, WindowSpec,
    ZscoreSpec,
};
use crate::topic::TopicFilter;
use crate::value::{Ty, Val};

/// Deepest expression tree compiled. Compiling and evaluating recurse
/// once per level; this keeps them far from the stack's end (a debug
/// build's frames are large) while no real rule comes close.
pub(crate) const MAX_TREE_DEPTH: usize = 64;

/// Most FOR per rule (their timers are updated through a 64-bit mask).
const MAX_TIMERS: usize = 64;

/// Most panes a hopping window may span (bounds the merge per window).
const MAX_PANES: i64 = 1_000;

pub(crate) fn compile(sql: &str) -> Result<Plan, CompileError> {
    let map = SourceMap::new(sql);
    let parsed = parse::parse(sql, &map)?;
    let mut c = Compiler {
        map,
        durations: parsed.durations,
        fields: Vec::new(),
        keys: Vec::new(),
        key_tys: Vec::new(),
        window: None,
        aggs: Vec::new(),
        timers: Vec::new(),
        zscores: Vec::new(),
        kind: RuleKind::Filter,
        fallback: Location::new(1, 1),
    };
    let sel = parsed.select;
    c.check_shape(&sel)?;
    c.check_depth(&sel, parsed.clear.as_ref().map(|(e, _)| e))?;
    let source = c.from(&sel, parsed.from_span)?;

    let group_exprs: &[SqlExpr] = match &sel.group_by {
        GroupByExpr::Expressions(exprs, mods) if mods.is_empty() => exprs,
        _ => {
            return Err(c.err(
                c.select_start(&sel),
                K::Unsupported("GROUP BY ALL and GROUP BY modifiers".into()),
            ))
        }
    };
    let grouped = !group_exprs.is_empty();
    let silence_ms = match &sel.having {
        Some(h) => c.silence_of(h)?,
        None => None,
    };
    if let (Some(h), false) = (&sel.having, grouped) {
        return Err(c.err(c.span_pos(h.span()), K::HavingWithoutGroupBy));
    }
    let mut device_key = None;
    for g in group_exprs {
        if c.window_of(g)? {
            continue;
        }
        let (e, ty) = c.expr(g, Cx::message(Clause::GroupBy))?;
        if e == Expr::Device {
            device_key = Some(c.keys.len());
        }
        c.keys.push(e);
        c.key_tys.push(ty);
    }
    c.kind = match (grouped, silence_ms) {
        (false, _) => RuleKind::Filter,
        (true, Some(_)) => RuleKind::Silence,
        (true, None) => RuleKind::Windowed,
    };
    let group_pos = group_exprs
        .first()
        .map(|g| c.span_pos(g.span()))
        .unwrap_or_else(|| c.map.end());
    match (c.kind, c.window) {
        (RuleKind::Windowed, None) => {
            return Err(c.err(
                group_pos,
                K::Misplaced(
                    "GROUP BY needs a window: TUMBLING(10s), HOPPING(10s, 5s) or SLIDING(30s) \
                     (or HAVING silent(10m) for silence detection)"
                        .into(),
                ),
            ))
        }
        (RuleKind::Silence, Some(_)) => {
            return Err(c.err(
                group_pos,
                K::Misplaced(
                    "silent() rules take no window: GROUP BY device HAVING silent(10m)".into(),
                ),
            ))
        }
        _ => {}
    }

    let (filter, columns, condition, clear, clear_timers);
    match c.kind {
        RuleKind::Filter => {
            columns = c.columns(&sel.projection, Scope::Message)?;
            condition = match &sel.selection {
                Some(w) => Some(c.condition(w, Cx::message(Clause::Where).with_for(), "WHERE")?),
                None => None,
            };
            filter = None;
            let before = c.timers.len();
            clear = c.clear(&parsed.clear, Scope::Message)?;
            clear_timers = before..c.timers.len();
        }
        RuleKind::Windowed => {
            filter = match &sel.selection {
                Some(w) => Some(c.condition(w, Cx::message(Clause::Where), "WHERE")?),
                None => None,
            };
            columns = c.columns(&sel.projection, Scope::Group)?;
            condition = match &sel.having {
                Some(h) => Some(c.condition(h, Cx::group(Clause::Having).with_for(), "HAVING")?),
                None => None,
            };
            let before = c.timers.len();
            clear = c.clear(&parsed.clear, Scope::Group)?;
            clear_timers = before..c.timers.len();
        }
        RuleKind::Silence => {
            filter = match &sel.selection {
                Some(w) => Some(c.condition(w, Cx::message(Clause::Where), "WHERE")?),
                None => None,
            };
            columns = c.columns(&sel.projection, Scope::Group)?;
            condition = None;
            if let Some((_, loc)) = &parsed.clear {
                return Err(c.err(
                    c.loc_pos(*loc),
                    K::Misplaced(
                        "a silence rule clears by itself when the device sends again".into(),
                    ),
                ));
            }
            clear = None;
            clear_timers = 0..0;
        }
    }
    Ok(Plan {
        kind: c.kind,
        source,
        fields: c.fields,
        columns,
        filter,
        keys: c.keys,
        device_key,
        window: c.window,
        aggs: c.aggs,
        condition,
        clear,
        timers: c.timers,
        clear_timers,
        zscores: c.zscores,
        silence_ms,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Message,
    Group,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clause {
    Select,
    Where,
    GroupBy,
    Having,
    Clear,
    AggArg,
}

/// Where an expression is being compiled.
#[derive(Debug, Clone, Copy)]
struct Cx {
    scope: Scope,
    clause: Clause,
    allow_for: bool,
    in_for: bool,
    in_zscore: bool,
}

impl Cx {
    fn message(clause: Clause) -> Cx {
        Cx {
            scope: Scope::Message,
            clause,
            allow_for: false,
            in_for: false,
            in_zscore: false,
        }
    }
    fn group(clause: Clause) -> Cx {
        Cx {
            scope: Scope::Group,
            ..Cx::message(clause)
        }
    }
    fn with_for(self) -> Cx {
        Cx {
            allow_for: true,
            ..self
        }
    }
}

struct Compiler<'a> {
    map: SourceMap<'a>,
    durations: Vec<i64>,
    fields: Vec<FieldPath>,
    keys: Vec<Expr>,
    key_tys: Vec<Ty>,
    window: Option<WindowSpec>,
    aggs: Vec<AggSpec>,
    timers: Vec<TimerSpec>,
    zscores: Vec<ZscoreSpec>,
    kind: RuleKind,
    /// Position used when sqlparser has no span for a node.
    fallback: Location,
}

/// What a trial compilation may add, to undo it.
struct Snapshot {
    fields: usize,
    aggs: usize,
    timers: usize,
    zscores: usize,
}

type Typed = (Expr, Ty);

impl Compiler<'_> {
    fn err(&self, position: Position, kind: K) -> CompileError {
        CompileError { position, kind }
    }

    fn loc_pos(&self, loc: Location) -> Position {
        let loc = if loc.line == 0 { self.fallback } else { loc };
        self.map.position(loc.line, loc.column)
    }

    fn span_pos(&self, span: Span) -> Position {
        self.loc_pos(span.start)
    }

    fn select_start(&self, sel: &sqlparser::ast::Select) -> Position {
        self.span_pos(sel.select_token.0.span)
    }

    /// Refuse expression trees deeper than [`MAX_TREE_DEPTH`] before the
    /// recursive compiler sees them.
    fn check_depth(
        &self,
        sel: &sqlparser::ast::Select,
        clear: Option<&SqlExpr>,
    ) -> Result<(), CompileError> {
        let mut roots: Vec<&SqlExpr> = Vec::new();
        for item in &sel.projection {
            match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    roots.push(e)
                }
                _ => {}
            }
        }
        roots.extend(sel.selection.iter());
        roots.extend(sel.having.iter());
        roots.extend(clear);
        if let GroupByExpr::Expressions(exprs, _) = &sel.group_by {
            roots.extend(exprs.iter());
        }
        for root in roots {
            if tree_depth(root) > MAX_TREE_DEPTH {
                return Err(self.err(
                    self.span_pos(root.span()),
                    K::Unsupported(format!(
                        "expressions nested deeper than {MAX_TREE_DEPTH} levels"
                    )),
                ));
            }
        }
        Ok(())
    }

    /// Refuse the SELECT features rules do not have.
    fn check_shape(&self, sel: &sqlparser::ast::Select) -> Result<(), CompileError> {
        let pos = self.select_start(sel);
        let unsupported = |what: &str| Err(self.err(pos, K::Unsupported(what.to_string())));
        if sel.distinct.is_some() {
            return unsupported("DISTINCT");
        }
        if sel.top.is_some() || sel.into.is_some() || sel.exclude.is_some() {
            return unsupported("TOP/INTO/EXCLUDE");
        }
        if !sel.lateral_views.is_empty() || sel.prewhere.is_some() || !sel.connect_by.is_empty() {
            return unsupported("LATERAL VIEW/PREWHERE/CONNECT BY");
        }
        if !sel.cluster_by.is_empty() || !sel.distribute_by.is_empty() || !sel.sort_by.is_empty() {
            return unsupported("CLUSTER/DISTRIBUTE/SORT BY");
        }
        if !sel.named_window.is_empty() || sel.qualify.is_some() {
            return unsupported("WINDOW/QUALIFY");
        }
        if sel.value_table_mode.is_some()
            || sel.select_modifiers.is_some()
            || !sel.optimizer_hints.is_empty()
            || sel.flavor != SelectFlavor::Standard
        {
            return unsupported("this SELECT form");
        }
        Ok(())
    }

    fn from(
        &self,
        sel: &sqlparser::ast::Select,
        from_span: Option<Span>,
    ) -> Result<TopicFilter, CompileError> {
        let hint = "FROM takes one topic filter in single quotes, e.g. FROM 'devices/+/telemetry'";
        let Some(twj) = sel.from.first() else {
            return Err(self.err(
                self.map.end(),
                K::Misplaced(format!("missing FROM: {hint}")),
            ));
        };
        let pos = from_span.map_or_else(|| self.select_start(sel), |s| self.span_pos(s));
        if sel.from.len() > 1 || !twj.joins.is_empty() {
            return Err(self.err(pos, K::Unsupported("joins and several sources".into())));
        }
        let TableFactor::Table {
            name, alias, args, ..
        } = &twj.relation
        else {
            return Err(self.err(pos, K::Misplaced(hint.into())));
        };
        let [ObjectNamePart::Identifier(ident)] = name.0.as_slice() else {
            return Err(self.err(pos, K::Misplaced(hint.into())));
        };
        if ident.quote_style != Some('\'') || alias.is_some() || args.is_some() {
            let pos = if ident.span.start.line == 0 {
                pos
            } else {
                self.span_pos(ident.span)
            };
            return Err(self.err(pos, K::Misplaced(hint.into())));
        }
        TopicFilter::parse(&ident.value).map_err(|reason| {
            self.err(
                pos,
                K::BadTopicFilter {
                    filter: ident.value.clone(),
                    reason,
                },
            )
        })
    }

    /// `silent(d)` as the whole HAVING: the silence duration.
    fn silence_of(&self, having: &SqlExpr) -> Result<Option<i64>, CompileError> {
        let mut h = having;
        while let SqlExpr::Nested(inner) = h {
            h = inner;
        }
        let SqlExpr::Function(f) = h else {
            return Ok(None);
        };
        if function_name(f).as_deref() != Some("silent") {
            return Ok(None);
        }
        let args = self.args(f, h.span())?;
        let [arg] = args.as_slice() else {
            return Err(self.arity("silent", "1 argument (a duration)", args.len(), h.span()));
        };
        let Some(arg) = arg else {
            return Err(self.err(
                self.span_pos(h.span()),
                K::Misplaced("silent(*) needs a duration".into()),
            ));
        };
        self.duration_arg(arg).map(Some)
    }

    /// A window function in GROUP BY: records it, returns whether it was one.
    fn window_of(&mut self, g: &SqlExpr) -> Result<bool, CompileError> {
        let SqlExpr::Function(f) = g else {
            return Ok(false);
        };
        let name = function_name(f).unwrap_or_default();
        if !matches!(name.as_str(), "tumbling" | "hopping" | "sliding") {
            return Ok(false);
        }
        let pos = self.span_pos(g.span());
        if self.window.is_some() {
            return Err(self.err(pos, K::Misplaced("only one window per rule".into())));
        }
        let args = self.args(f, g.span())?;
        let mut ms = Vec::new();
        for a in &args {
            match a {
                Some(a) => ms.push(self.duration_arg(a)?),
                None => {
                    return Err(self.err(pos, K::Misplaced(format!("{name}(*) needs a duration"))))
                }
            }
        }
        self.window = Some(match (name.as_str(), ms.as_slice()) {
            ("tumbling", &[size]) => WindowSpec::Tumbling { size },
            ("sliding", &[size]) => WindowSpec::Sliding { size },
            ("hopping", &[size, hop]) => {
                if hop > size {
                    return Err(self.err(
                        pos,
                        K::Misplaced(
                            "HOPPING(size, hop): the hop cannot be longer than the window".into(),
                        ),
                    ));
                }
                if size / gcd(size, hop) > MAX_PANES {
                    return Err(self.err(
                        pos,
                        K::Misplaced(format!(
                            "HOPPING(size, hop): size / gcd(size, hop) must be at most {MAX_PANES}"
                        )),
                    ));
                }
                WindowSpec::Hopping { size, hop }
            }
            ("hopping", _) => {
                return Err(self.arity("HOPPING", "2 arguments (size, hop)", args.len(), g.span()))
            }
            (_, _) => {
                return Err(self.arity(
                    &name.to_uppercase(),
                    "1 argument (a duration)",
                    args.len(),
                    g.span(),
                ))
            }
        });
        Ok(true)
    }

    fn duration_arg(&self, e: &SqlExpr) -> Result<i64, CompileError> {
        let pos = self.span_pos(e.span());
        match e {
            SqlExpr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) => duration::parse(s).map_err(|reason| {
                    self.err(
                        pos,
                        K::BadDuration {
                            text: s.clone(),
                            reason,
                        },
                    )
                }),
                other => Err(self.err(
                    pos,
                    K::BadDuration {
                        text: other.to_string(),
                        reason: "needs a unit, e.g. 10s, 5m, 1h",
                    },
                )),
            },
            other => Err(self.err(
                pos,
                K::BadDuration {
                    text: other.to_string(),
                    reason: "must be a literal duration, e.g. 10s",
                },
            )),
        }
    }

    fn arity(&self, function: &str, expected: &str, found: usize, span: Span) -> CompileError {
        self.err(
            self.span_pos(span),
            K::WrongArity {
                function: function.to_string(),
                expected: expected.to_string(),
                found,
            },
        )
    }

    /// A function's positional arguments; `None` stands for `*`.
    fn args<'e>(
        &self,
        f: &'e Function,
        span: Span,
    ) -> Result<Vec<Option<&'e SqlExpr>>, CompileError> {
        let pos = self.span_pos(span);
        let unsupported = |what: &str| self.err(pos, K::Unsupported(what.to_string()));
        if f.filter.is_some() || f.over.is_some() || !f.within_group.is_empty() {
            return Err(unsupported("FILTER/OVER/WITHIN GROUP"));
        }
        if f.null_treatment.is_some()
            || f.uses_odbc_syntax
            || !matches!(f.parameters, FunctionArguments::None)
        {
            return Err(unsupported("this function call form"));
        }
        let list = match &f.args {
            FunctionArguments::List(list) => list,
            FunctionArguments::None => return Ok(Vec::new()),
            FunctionArguments::Subquery(_) => return Err(unsupported("subqueries")),
        };
        if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
            return Err(unsupported("DISTINCT/ORDER BY inside a function call"));
        }
        list.args
            .iter()
            .map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(Some(e)),
                FunctionArg::Unnamed(FunctionArgExpr::Wildcard) => Ok(None),
                _ => Err(unsupported("named or qualified-wildcard arguments")),
            })
            .collect()
    }

    fn columns(&mut self, items: &[SelectItem], scope: Scope) -> Result<Vec<Column>, CompileError> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let cx = Cx {
                scope,
                ..Cx::message(Clause::Select)
            };
            match item {
                SelectItem::UnnamedExpr(e) => {
                    let (expr, _) = self.expr(e, cx)?;
                    out.push(Column::Expr {
                        name: column_name(e).into(),
                        expr,
                    });
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    let (e, _) = self.expr(expr, cx)?;
                    out.push(Column::Expr {
                        name: alias.value.as_str().into(),
                        expr: e,
                    });
                }
                SelectItem::Wildcard(_) if scope == Scope::Message => out.push(Column::Star),
                SelectItem::Wildcard(_) => {
                    return Err(self.err(
                        self.span_pos(item.span()),
                        K::Misplaced(
                            "SELECT * in a grouped rule: select keys and aggregates, e.g. SELECT device, avg(temperature)".into(),
                        ),
                    ))
                }
                _ => {
                    return Err(self.err(
                        self.span_pos(item.span()),
                        K::Unsupported("this SELECT item".into()),
                    ))
                }
            }
        }
        Ok(out)
    }

    fn condition(&mut self, e: &SqlExpr, cx: Cx, clause: &str) -> Result<Expr, CompileError> {
        let (expr, ty) = self.expr(e, cx)?;
        if !ty.fits(Ty::Bool) {
            return Err(self.err(
                self.span_pos(e.span()),
                K::Type(format!(
                    "{clause} must be a condition (true/false), found {}",
                    ty.name()
                )),
            ));
        }
        Ok(expr)
    }

    fn clear(
        &mut self,
        clear: &Option<(SqlExpr, Location)>,
        scope: Scope,
    ) -> Result<Option<Expr>, CompileError> {
        let Some((e, loc)) = clear else {
            return Ok(None);
        };
        self.fallback = *loc;
        let cx = Cx {
            scope,
            ..Cx::message(Clause::Clear)
        }
        .with_for();
        self.condition(e, cx, "CLEAR WHEN").map(Some)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            fields: self.fields.len(),
            aggs: self.aggs.len(),
            timers: self.timers.len(),
            zscores: self.zscores.len(),
        }
    }

    fn restore(&mut self, s: Snapshot) {
        self.fields.truncate(s.fields);
        self.aggs.truncate(s.aggs);
        self.timers.truncate(s.timers);
        self.zscores.truncate(s.zscores);
    }

    /// In group scope: the GROUP BY key this expression is, if any.
    fn match_key(&mut self, e: &SqlExpr) -> Option<usize> {
        if self.keys.is_empty() {
            return None;
        }
        let snap = self.snapshot();
        let trial = self.expr(e, Cx::message(Clause::GroupBy));
        self.restore(snap);
        let (expr, _) = trial.ok()?;
        self.keys.iter().position(|k| *k == expr)
    }

    fn expr(&mut self, e: &SqlExpr, cx: Cx) -> Result<Typed, CompileError> {
        if cx.scope == Scope::Group && !matches!(e, SqlExpr::Value(_) | SqlExpr::Nested(_)) {
            if let Some(i) = self.match_key(e) {
                return Ok((Expr::Key(i), self.key_tys[i]));
            }
        }
        let pos = self.span_pos(e.span());
        match e {
            SqlExpr::Identifier(id) => self.name(std::slice::from_ref(id), cx, pos),
            SqlExpr::CompoundIdentifier(ids) => self.name(ids, cx, pos),
            SqlExpr::Value(v) => self.literal(&v.value, pos),
            SqlExpr::Nested(inner) => self.expr(inner, cx),
            SqlExpr::UnaryOp { op, expr } => {
                let (a, ty) = self.expr(expr, cx)?;
                match op {
                    UnaryOperator::Minus => {
                        self.want(ty, Ty::Num, "-", expr)?;
                        Ok((Expr::Neg(Box::new(a)), Ty::Num))
                    }
                    UnaryOperator::Plus => {
                        self.want(ty, Ty::Num, "+", expr)?;
                        Ok((a, Ty::Num))
                    }
                    UnaryOperator::Not => {
                        self.want(ty, Ty::Bool, "NOT", expr)?;
                        Ok((Expr::Not(Box::new(a)), Ty::Bool))
                    }
                    other => Err(self.err(pos, K::Unsupported(format!("operator `{other}`")))),
                }
            }
            SqlExpr::BinaryOp { left, op, right } => self.binary(left, op, right, cx, pos),
            SqlExpr::IsNull(a) | SqlExpr::IsNotNull(a) => {
                let (arg, _) = self.expr(a, cx)?;
                Ok((
                    Expr::IsNull {
                        arg: Box::new(arg),
                        negated: matches!(e, SqlExpr::IsNotNull(_)),
                    },
                    Ty::Bool,
                ))
            }
            SqlExpr::IsDistinctFrom(lhs, rhs) => match for_marker(rhs) {
                Some(n) => self.for_duration(lhs, n, cx, self.span_pos(rhs.span())),
                None => Err(self.err(pos, K::Unsupported("IS DISTINCT FROM".into()))),
            },
            SqlExpr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                let (a, ta) = self.expr(expr, cx)?;
                let (l, tl) = self.expr(low, cx)?;
                let (h, th) = self.expr(high, cx)?;
                self.comparable(ta, tl, false, "BETWEEN", low)?;
                self.comparable(ta, th, false, "BETWEEN", high)?;
                Ok((
                    Expr::Between {
                        arg: Box::new(a),
                        low: Box::new(l),
                        high: Box::new(h),
                        negated: *negated,
                    },
                    Ty::Bool,
                ))
            }
            SqlExpr::InList {
                expr,
                list,
                negated,
            } => {
                let (a, ta) = self.expr(expr, cx)?;
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let (x, tx) = self.expr(item, cx)?;
                    self.comparable(ta, tx, true, "IN", item)?;
                    items.push(x);
                }
                Ok((
                    Expr::InList {
                        arg: Box::new(a),
                        list: items,
                        negated: *negated,
                    },
                    Ty::Bool,
                ))
            }
            SqlExpr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                let operand = match operand {
                    Some(o) => Some(self.expr(o, cx)?),
                    None => None,
                };
                let mut whens = Vec::with_capacity(conditions.len());
                let mut result_ty: Option<Ty> = None;
                let mut merge = |t: Ty| {
                    result_ty = Some(match result_ty {
                        None => t,
                        Some(r) if r == t || t == Ty::Null => r,
                        Some(Ty::Null) => t,
                        Some(_) => Ty::Any,
                    })
                };
                for w in conditions {
                    let (c, tc) = self.expr(&w.condition, cx)?;
                    match &operand {
                        Some((_, to)) => self.comparable(*to, tc, true, "CASE", &w.condition)?,
                        None => self.want(tc, Ty::Bool, "CASE WHEN", &w.condition)?,
                    }
                    let (r, tr) = self.expr(&w.result, cx)?;
                    merge(tr);
                    whens.push((c, r));
                }
                let otherwise = match else_result {
                    Some(x) => {
                        let (x, tx) = self.expr(x, cx)?;
                        merge(tx);
                        Some(Box::new(x))
                    }
                    None => None,
                };
                Ok((
                    Expr::Case {
                        operand: operand.map(|(o, _)| Box::new(o)),
                        whens,
                        otherwise,
                    },
                    result_ty.unwrap_or(Ty::Any),
                ))
            }
            SqlExpr::Function(f) => self.call(f, e.span(), cx),
            other => {
                let text = other.to_string();
                let short: String = text.chars().take(40).collect();
                Err(self.err(pos, K::Unsupported(format!("`{short}`"))))
            }
        }
    }

    fn want(&self, got: Ty, want: Ty, op: &str, e: &SqlExpr) -> Result<(), CompileError> {
        if got.fits(want) {
            return Ok(());
        }
        Err(self.err(
            self.span_pos(e.span()),
            K::Type(format!(
                "`{op}` needs {}, found {}",
                want.name(),
                got.name()
            )),
        ))
    }

    fn comparable(
        &self,
        a: Ty,
        b: Ty,
        equality: bool,
        op: &str,
        e: &SqlExpr,
    ) -> Result<(), CompileError> {
        let known = |t: Ty| !matches!(t, Ty::Any | Ty::Null);
        if known(a) && known(b) && a != b {
            return Err(self.err(
                self.span_pos(e.span()),
                K::Type(format!(
                    "`{op}` cannot compare {} with {}",
                    a.name(),
                    b.name()
                )),
            ));
        }
        if !equality && (a == Ty::Bool || b == Ty::Bool) {
            return Err(self.err(
                self.span_pos(e.span()),
                K::Type(format!("`{op}` cannot order booleans")),
            ));
        }
        Ok(())
    }

    fn binary(
        &mut self,
        left: &SqlExpr,
        op: &BinaryOperator,
        right: &SqlExpr,
        cx: Cx,
        pos: Position,
    ) -> Result<Typed, CompileError> {
        let (l, tl) = self.expr(left, cx)?;
        let (r, tr) = self.expr(right, cx)?;
        let (lb, rb) = (Box::new(l), Box::new(r));
        let sym = op.to_string();
        let arith = |a: Arith| (Expr::Arith(a, lb.clone(), rb.clone()), Ty::Num);
        let cmp = |c: Cmp| (Expr::Cmp(c, lb.clone(), rb.clone()), Ty::Bool);
        let out = match op {
            BinaryOperator::Plus => arith(Arith::Add),
            BinaryOperator::Minus => arith(Arith::Sub),
            BinaryOperator::Multiply => arith(Arith::Mul),
            BinaryOperator::Divide => arith(Arith::Div),
            BinaryOperator::Modulo => arith(Arith::Mod),
            BinaryOperator::Eq => cmp(Cmp::Eq),
            BinaryOperator::NotEq => cmp(Cmp::Ne),
            BinaryOperator::Lt => cmp(Cmp::Lt),
            BinaryOperator::LtEq => cmp(Cmp::Le),
            BinaryOperator::Gt => cmp(Cmp::Gt),
            BinaryOperator::GtEq => cmp(Cmp::Ge),
            BinaryOperator::And => (Expr::And(lb.clone(), rb.clone()), Ty::Bool),
            BinaryOperator::Or => (Expr::Or(lb.clone(), rb.clone()), Ty::Bool),
            BinaryOperator::StringConcat => (Expr::Call(Func::Concat, vec![*lb, *rb]), Ty::Str),
            other => return Err(self.err(pos, K::Unsupported(format!("operator `{other}`")))),
        };
        match &out.0 {
            Expr::Arith(..) => {
                self.want(tl, Ty::Num, &sym, left)?;
                self.want(tr, Ty::Num, &sym, right)?;
            }
            Expr::Cmp(c, ..) => {
                self.comparable(tl, tr, matches!(c, Cmp::Eq | Cmp::Ne), &sym, right)?
            }
            Expr::And(..) | Expr::Or(..) => {
                self.want(tl, Ty::Bool, &sym, left)?;
                self.want(tr, Ty::Bool, &sym, right)?;
            }
            _ => {}
        }
        Ok(out)
    }

    fn for_duration(
        &mut self,
        lhs: &SqlExpr,
        n: usize,
        cx: Cx,
        pos: Position,
    ) -> Result<Typed, CompileError> {
        if cx.in_for {
            return Err(self.err(
                pos,
                K::Misplaced("FOR cannot be nested in another FOR".into()),
            ));
        }
        if !cx.allow_for {
            let why = match (cx.clause, self.kind) {
                (Clause::Where, RuleKind::Windowed | RuleKind::Silence) => {
                    "FOR in WHERE of a grouped rule: WHERE filters single messages, put the duration on HAVING"
                }
                _ => "FOR belongs in the firing condition: WHERE (without GROUP BY), HAVING or CLEAR WHEN",
            };
            return Err(self.err(pos, K::Misplaced(why.into())));
        }
        let ms = *self
            .durations
            .get(n)
            .ok_or_else(|| self.err(pos, K::Syntax("bad FOR".into())))?;
        let (arg, ty) = self.expr(lhs, Cx { in_for: true, ..cx })?;
        self.want(ty, Ty::Bool, "FOR", lhs)?;
        let slot = self.timers.len();
        if slot >= MAX_TIMERS {
            return Err(self.err(
                pos,
                K::Misplaced(format!("at most {MAX_TIMERS} FOR per rule")),
            ));
        }
        self.timers.push(TimerSpec { arg, ms });
        Ok((Expr::For { slot, ms }, Ty::Bool))
    }

    fn literal(&self, v: &Value, pos: Position) -> Result<Typed, CompileError> {
        Ok(match v {
            Value::Number(n, _) => {
                let x: f64 = n
                    .parse()
                    .map_err(|_| self.err(pos, K::Syntax(format!("bad number `{n}`"))))?;
                (Expr::Lit(Val::Num(x)), Ty::Num)
            }
            Value::SingleQuotedString(s) => (Expr::Lit(Val::Str(s.clone().into())), Ty::Str),
            Value::Boolean(b) => (Expr::Lit(Val::Bool(*b)), Ty::Bool),
            Value::Null => (Expr::Lit(Val::Null), Ty::Null),
            other => return Err(self.err(pos, K::Unsupported(format!("literal `{other}`")))),
        })
    }

    fn name(&mut self, parts: &[Ident], cx: Cx, pos: Position) -> Result<Typed, CompileError> {
        let Some(first) = parts.first() else {
            return Err(self.err(pos, K::Syntax("empty name".into())));
        };
        let special = first.quote_style.is_none();
        let lower = first.value.to_ascii_lowercase();
        let dotted = || {
            parts
                .iter()
                .map(|p| p.value.as_str())
                .collect::<Vec<_>>()
                .join(".")
        };
        if special && parts.len() == 1 {
            let per_message = match lower.as_str() {
                "device" => Some((Expr::Device, Ty::Str)),
                "topic" => Some((Expr::Topic, Ty::Str)),
                "payload" => Some((Expr::Payload, Ty::Any)),
                _ => None,
            };
            if let Some(found) = per_message {
                return match cx.scope {
                    Scope::Message => Ok(found),
                    Scope::Group => Err(self.err(pos, K::NotGrouped(lower))),
                };
            }
            match lower.as_str() {
                "ts" => return Ok((Expr::Ts, Ty::Num)),
                "window_start" | "window_end" => {
                    return match (cx.scope, self.kind, self.window) {
                        (Scope::Group, RuleKind::Windowed, Some(_)) => Ok((
                            if lower == "window_start" {
                                Expr::WindowStart
                            } else {
                                Expr::WindowEnd
                            },
                            Ty::Num,
                        )),
                        _ => Err(self.err(
                            pos,
                            K::Misplaced(format!(
                                "`{lower}` exists only in SELECT/HAVING of a windowed rule \
                                 (write payload.{lower} for a payload field)"
                            )),
                        )),
                    };
                }
                _ => {}
            }
        }
        let segments: Vec<Box<str>> = if special && lower == "payload" {
            parts[1..].iter().map(|p| p.value.as_str().into()).collect()
        } else {
            parts.iter().map(|p| p.value.as_str().into()).collect()
        };
        let name: Arc<str> = segments.join(".").into();
        if cx.scope == Scope::Group {
            return Err(self.err(pos, K::NotGrouped(dotted())));
        }
        let index = match self.fields.iter().position(|f| *f.segments == *segments) {
            Some(i) => i,
            None => {
                self.fields.push(FieldPath {
                    segments: segments.into(),
                    name,
                });
                self.fields.len() - 1
            }
        };
        Ok((Expr::Field(index), Ty::Any))
    }

    fn call(&mut self, f: &Function, span: Span, cx: Cx) -> Result<Typed, CompileError> {
        let pos = self.span_pos(span);
        let Some(name) = function_name(f) else {
            return Err(self.err(pos, K::Unsupported("qualified function names".into())));
        };
        let args = self.args(f, span)?;
        let n = args.len();
        let exprs = |c: &Self| -> Result<Vec<&SqlExpr>, CompileError> {
            args.iter()
                .map(|a| {
                    a.ok_or_else(|| {
                        c.err(
                            pos,
                            K::Misplaced(format!(
                                "`*` is only allowed in count(*), not in {name}()"
                            )),
                        )
                    })
                })
                .collect()
        };

        if let Some(func) = AggFunc::from_name(&name) {
            return self.aggregate(func, &args, span, cx);
        }
        match name.as_str() {
            "tumbling" | "hopping" | "sliding" => {
                return Err(self.err(
                    pos,
                    K::Misplaced(format!(
                        "{} is a window: it goes in GROUP BY, e.g. GROUP BY device, TUMBLING(10s)",
                        name.to_uppercase()
                    )),
                ))
            }
            "silent" => {
                return Err(self.err(
                    pos,
                    K::Misplaced(
                        "silent(d) must be the whole HAVING of a rule grouped without a window: \
                         GROUP BY device HAVING silent(10m)"
                            .into(),
                    ),
                ))
            }
            "last_seen" => {
                if n != 0 {
                    return Err(self.arity("last_seen", "no arguments", n, span));
                }
                return match (self.kind, cx.scope) {
                    (RuleKind::Silence, Scope::Group) => Ok((Expr::LastSeen, Ty::Num)),
                    _ => Err(self.err(
                        pos,
                        K::Misplaced("last_seen() exists only in silence rules".into()),
                    )),
                };
            }
            "topic" | "topic_segment" => {
                let args = exprs(self)?;
                if name == "topic" && args.is_empty() {
                    return self.per_message(Expr::Topic, Ty::Str, "topic()", cx, pos);
                }
                let [arg] = args.as_slice() else {
                    return Err(self.arity(&name, "1 argument (a level number from 1)", n, span));
                };
                let level = match arg {
                    SqlExpr::Value(v) => match &v.value {
                        Value::Number(s, _) => {
                            s.parse::<usize>().ok().filter(|&l| (1..=64).contains(&l))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                let Some(level) = level else {
                    return Err(self.err(
                        self.span_pos(arg.span()),
                        K::Type(format!(
                            "{name}(n) needs a literal level number from 1 to 64"
                        )),
                    ));
                };
                return self.per_message(
                    Expr::TopicSegment(level - 1),
                    Ty::Str,
                    &format!("{name}({level})"),
                    cx,
                    pos,
                );
            }
            "zscore" => {
                let args = exprs(self)?;
                if !(1..=2).contains(&n) {
                    return Err(self.arity("zscore", "1 or 2 arguments (value, samples)", n, span));
                }
                if cx.in_zscore {
                    return Err(self.err(
                        pos,
                        K::Misplaced("zscore() cannot be nested in zscore()".into()),
                    ));
                }
                let (arg, ty) = self.expr(
                    args[0],
                    Cx {
                        in_zscore: true,
                        ..cx
                    },
                )?;
                self.want(ty, Ty::Num, "zscore", args[0])?;
                let samples = match args.get(1) {
                    None => anomaly::DEFAULT_SAMPLES,
                    Some(s) => match s {
                        SqlExpr::Value(v) => match &v.value {
                            Value::Number(t, _) => t.parse::<f64>().ok().filter(|x| (2.0..=1e6).contains(x)),
                            _ => None,
                        },
                        _ => None,
                    }
                    .ok_or_else(|| {
                        self.err(
                            self.span_pos(s.span()),
                            K::Type("zscore(x, n): n must be a literal number of samples from 2 to 1000000".into()),
                        )
                    })?,
                };
                let spec = ZscoreSpec {
                    arg,
                    samples,
                    over_groups: cx.scope == Scope::Group,
                };
                // One baseline per distinct zscore: the same call in WHERE
                // and SELECT reads the same score.
                let slot = match self.zscores.iter().position(|z| *z == spec) {
                    Some(i) => i,
                    None => {
                        self.zscores.push(spec);
                        self.zscores.len() - 1
                    }
                };
                return Ok((Expr::Zscore { slot }, Ty::Num));
            }
            "inside" => {
                let args = exprs(self)?;
                let [lat, lon, poly] = args.as_slice() else {
                    return Err(self.arity(
                        "inside",
                        "3 arguments (lat, lon, 'POLYGON((lon lat, ...))')",
                        n,
                        span,
                    ));
                };
                let (la, tla) = self.expr(lat, cx)?;
                self.want(tla, Ty::Num, "inside", lat)?;
                let (lo, tlo) = self.expr(lon, cx)?;
                self.want(tlo, Ty::Num, "inside", lon)?;
                let ppos = self.span_pos(poly.span());
                let text = match poly {
                    SqlExpr::Value(v) => match &v.value {
                        Value::SingleQuotedString(s) => s,
                        _ => {
                            return Err(self.err(
                                ppos,
                                K::BadPolygon(
                                    "must be a string literal 'POLYGON((lon lat, ...))'".into(),
                                ),
                            ))
                        }
                    },
                    _ => {
                        return Err(self.err(
                            ppos,
                            K::BadPolygon(
                                "must be a string literal 'POLYGON((lon lat, ...))'".into(),
                            ),
                        ))
                    }
                };
                let polygon =
                    Polygon::parse_wkt(text).map_err(|r| self.err(ppos, K::BadPolygon(r)))?;
                return Ok((
                    Expr::Inside {
                        lat: Box::new(la),
                        lon: Box::new(lo),
                        polygon: Arc::new(polygon),
                    },
                    Ty::Bool,
                ));
            }
            _ => {}
        }

        let Some((func, min, max, arg_ty, ret)) = scalar(&name) else {
            return Err(self.err(pos, K::UnknownFunction(name)));
        };
        if n < min || n > max {
            let expected = match (min, max) {
                (a, b) if a == b => format!("{a} argument{}", if a == 1 { "" } else { "s" }),
                (a, usize::MAX) => {
                    format!("at least {a} argument{}", if a == 1 { "" } else { "s" })
                }
                (a, b) => format!("{a} to {b} arguments"),
            };
            return Err(self.arity(&name, &expected, n, span));
        }
        let mut out = Vec::with_capacity(n);
        for a in exprs(self)? {
            let (x, tx) = self.expr(a, cx)?;
            self.want(tx, arg_ty, &name, a)?;
            out.push(x);
        }
        Ok((Expr::Call(func, out), ret))
    }

    fn per_message(
        &self,
        e: Expr,
        ty: Ty,
        text: &str,
        cx: Cx,
        pos: Position,
    ) -> Result<Typed, CompileError> {
        match cx.scope {
            Scope::Message => Ok((e, ty)),
            Scope::Group => Err(self.err(pos, K::NotGrouped(text.to_string()))),
        }
    }

    fn aggregate(
        &mut self,
        func: AggFunc,
        args: &[Option<&SqlExpr>],
        span: Span,
        cx: Cx,
    ) -> Result<Typed, CompileError> {
        let pos = self.span_pos(span);
        let name = func.name();
        let misplaced = |reason: &'static str| {
            Err(CompileError {
                position: pos,
                kind: K::MisplacedAggregate {
                    function: name.to_string(),
                    reason,
                },
            })
        };
        match (cx.scope, cx.clause) {
            (Scope::Message, Clause::Where) => {
                return Err(self.err(pos, K::AggregateInWhere(name.to_string())))
            }
            (Scope::Message, Clause::AggArg) => {
                return misplaced("cannot be nested in another aggregate")
            }
            (Scope::Message, Clause::GroupBy) => return misplaced("is not allowed in GROUP BY"),
            (Scope::Message, _) => {
                return misplaced(
                    "needs GROUP BY with a window, e.g. GROUP BY device, TUMBLING(10s)",
                )
            }
            (Scope::Group, _) if self.kind == RuleKind::Silence => {
                return misplaced("has no window to aggregate over in a silence rule")
            }
            (Scope::Group, _) => {}
        }
        let arg = match args {
            [None] if func == AggFunc::Count => None,
            [None] => return misplaced("takes a value, not `*` (only count(*) does)"),
            [Some(a)] => {
                let (x, tx) = self.expr(a, Cx::message(Clause::AggArg))?;
                if func.numeric() {
                    self.want(tx, Ty::Num, name, a)?;
                }
                Some(x)
            }
            _ => return Err(self.arity(name, "1 argument", args.len(), span)),
        };
        let spec = AggSpec { func, arg };
        let index = match self.aggs.iter().position(|a| *a == spec) {
            Some(i) => i,
            None => {
                self.aggs.push(spec);
                self.aggs.len() - 1
            }
        };
        let ty = if func.numeric() || func == AggFunc::Count {
            Ty::Num
        } else {
            Ty::Any
        };
        Ok((Expr::Agg(index), ty))
    }
}

/// Depth of an expression tree. Recursive, but with a small frame and over
/// a tree whose size the parser's operator cap bounds.
fn tree_depth(e: &SqlExpr) -> usize {
    let max = |es: &mut dyn Iterator<Item = &SqlExpr>| es.map(tree_depth).max().unwrap_or(0);
    1 + match e {
        SqlExpr::BinaryOp { left, right, .. } | SqlExpr::IsDistinctFrom(left, right) => {
            tree_depth(left).max(tree_depth(right))
        }
        SqlExpr::UnaryOp { expr, .. }
        | SqlExpr::Nested(expr)
        | SqlExpr::IsNull(expr)
        | SqlExpr::IsNotNull(expr) => tree_depth(expr),
        SqlExpr::Between {
            expr, low, high, ..
        } => max(&mut [&**expr, &**low, &**high].into_iter()),
        SqlExpr::InList { expr, list, .. } => tree_depth(expr).max(max(&mut list.iter())),
        SqlExpr::Case {
            operand,
            conditions,
            else_result,
            ..
        } => max(&mut operand
            .iter()
            .map(|o| &**o)
            .chain(conditions.iter().flat_map(|w| [&w.condition, &w.result]))
            .chain(else_result.iter().map(|x| &**x))),
        SqlExpr::Function(f) => match &f.args {
            FunctionArguments::List(list) => max(&mut list.args.iter().filter_map(|a| match a {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                _ => None,
            })),
            _ => 0,
        },
        _ => 0,
    }
}

/// Scalar functions: (function, min args, max args, argument type, result type).
fn scalar(name: &str) -> Option<(Func, usize, usize, Ty, Ty)> {
    use Ty::*;
    Some(match name {
        "abs" => (Func::Abs, 1, 1, Num, Num),
        "round" => (Func::Round, 1, 2, Num, Num),
        "floor" => (Func::Floor, 1, 1, Num, Num),
        "ceil" | "ceiling" => (Func::Ceil, 1, 1, Num, Num),
        "sqrt" => (Func::Sqrt, 1, 1, Num, Num),
        "pow" | "power" => (Func::Pow, 2, 2, Num, Num),
        "exp" => (Func::Exp, 1, 1, Num, Num),
        "ln" => (Func::Ln, 1, 1, Num, Num),
        "log10" => (Func::Log10, 1, 1, Num, Num),
        "least" => (Func::Least, 1, usize::MAX, Num, Num),
        "greatest" => (Func::Greatest, 1, usize::MAX, Num, Num),
        "coalesce" => (Func::Coalesce, 1, usize::MAX, Any, Any),
        "lower" => (Func::Lower, 1, 1, Str, Str),
        "upper" => (Func::Upper, 1, 1, Str, Str),
        "concat" => (Func::Concat, 1, usize::MAX, Any, Str),
        "length" => (Func::Length, 1, 1, Str, Num),
        "distance" => (Func::Distance, 4, 4, Num, Num),
        _ => return None,
    })
}

fn function_name(f: &Function) -> Option<String> {
    match f.name.0.as_slice() {
        [ObjectNamePart::Identifier(id)] => Some(id.value.to_ascii_lowercase()),
        _ => None,
    }
}

/// `$forN` → N.
fn for_marker(e: &SqlExpr) -> Option<usize> {
    match e {
        SqlExpr::Value(v) => match &v.value {
            Value::Placeholder(p) => p.strip_prefix(FOR_MARKER)?.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

/// An unaliased column's name: a field's dotted path (without `payload.`),
/// else the expression as SQL.
fn column_name(e: &SqlExpr) -> String {
    match e {
        SqlExpr::Identifier(id) => id.value.clone(),
        SqlExpr::CompoundIdentifier(ids) => {
            let skip = usize::from(
                ids.len() > 1
                    && ids[0].quote_style.is_none()
                    && ids[0].value.eq_ignore_ascii_case("payload"),
            );
            ids[skip..]
                .iter()
                .map(|i| i.value.as_str())
                .collect::<Vec<_>>()
                .join(".")
        }
        other => other.to_string(),
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
