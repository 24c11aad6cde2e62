//! From rule text to a sqlparser syntax tree.
//!
//! The rule language is SQL plus three things sqlparser does not know:
//! durations (`10s`), `FOR <duration>` after a condition, and a trailing
//! `CLEAR WHEN <condition>`. Rather than rewrite the text (which would
//! shift every error position), we rewrite the *token stream*, whose tokens
//! keep their original line and column:
//!
//! * a number glued to a unit (`10s`, `500ms`) becomes the string token
//!   `'10s'`, so `TUMBLING(10s)` and `TUMBLING('10s')` are the same;
//! * `FOR 30s` becomes `IS DISTINCT FROM $forN`, where `$forN` names the
//!   N-th duration in a side table. `IS` binds tighter than AND/OR and
//!   looser than comparisons, which is the precedence we want:
//!   `a > 1 FOR 30s OR b > 7` is `(a > 1 FOR 30s) OR (b > 7)`. The compiler
//!   turns that `IS DISTINCT FROM $forN` back into a FOR node; user-written
//!   placeholders are refused here, so the marker cannot be forged;
//! * `CLEAR WHEN …` at the top level is cut off and parsed on its own as
//!   an expression.

use sqlparser::ast::{Expr as SqlExpr, Query, Select, SetExpr, Spanned};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan, Tokenizer};

use crate::duration;
use crate::error::{CompileError, CompileErrorKind, SourceMap};

/// Expression nesting sqlparser accepts (its default); deeper rules are
/// refused with a position rather than risking the stack.
const MAX_DEPTH: usize = 50;

/// Operators per rule. sqlparser builds `a + b + c …` in a loop, so its
/// depth limit does not bound such chains, while compiling, evaluating and
/// dropping the tree recurse once per operator: the cap keeps a hostile
/// rule from overflowing the stack (real rules use a few dozen).
pub(crate) const MAX_OPERATORS: usize = 256;

/// A rule's syntax tree plus what the token pass took out of it.
pub(crate) struct Parsed {
    pub(crate) select: Select,
    pub(crate) clear: Option<(SqlExpr, Location)>,
    /// FOR durations in milliseconds, by the N of `$forN`.
    pub(crate) durations: Vec<i64>,
    /// Where the FROM topic string is.
    pub(crate) from_span: Option<Span>,
}

/// The marker prefix of rewritten FOR durations.
pub(crate) const FOR_MARKER: &str = "$for";

pub(crate) fn parse(sql: &str, map: &SourceMap<'_>) -> Result<Parsed, CompileError> {
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| CompileError {
            position: map.position(e.location.line, e.location.column),
            kind: CompileErrorKind::Syntax(e.message),
        })?;
    let pass = rewrite(tokens, map)?;

    let mut parser = Parser::new(&dialect)
        .with_recursion_limit(MAX_DEPTH)
        .with_tokens_with_locations(pass.main);
    let query = parser.parse_query().map_err(|e| parser_error(e, map))?;
    while parser.consume_token(&Token::SemiColon) {}
    expect_end(&parser, map)?;
    let select = unwrap_select(*query, map)?;

    let clear = match pass.clear {
        Some((loc, tokens)) => {
            let mut parser = Parser::new(&dialect)
                .with_recursion_limit(MAX_DEPTH)
                .with_tokens_with_locations(tokens);
            let expr = parser.parse_expr().map_err(|e| parser_error(e, map))?;
            while parser.consume_token(&Token::SemiColon) {}
            expect_end(&parser, map)?;
            Some((expr, loc))
        }
        None => None,
    };
    Ok(Parsed {
        select,
        clear,
        durations: pass.durations,
        from_span: pass.from_span,
    })
}

struct Pass {
    main: Vec<TokenWithSpan>,
    clear: Option<(Location, Vec<TokenWithSpan>)>,
    durations: Vec<i64>,
    from_span: Option<Span>,
}

fn rewrite(tokens: Vec<TokenWithSpan>, map: &SourceMap<'_>) -> Result<Pass, CompileError> {
    let at = |loc: Location| map.position(loc.line, loc.column);
    let next_sig = |from: usize| {
        (from..tokens.len()).find(|&j| !matches!(tokens[j].token, Token::Whitespace(_)))
    };
    // A number glued to a unit word: the duration text and the index after it.
    let duration_at = |i: usize| -> Option<(String, Span, usize)> {
        let (Token::Number(n, false), Some(next)) = (&tokens[i].token, tokens.get(i + 1)) else {
            return None;
        };
        match &next.token {
            Token::Word(w)
                if w.quote_style.is_none()
                    && next.span.start == tokens[i].span.end
                    && duration::is_unit(&w.value) =>
            {
                Some((
                    format!("{n}{}", w.value),
                    Span::new(tokens[i].span.start, next.span.end),
                    i + 2,
                ))
            }
            _ => None,
        }
    };

    let mut pass = Pass {
        main: Vec::with_capacity(tokens.len()),
        clear: None,
        durations: Vec::new(),
        from_span: None,
    };
    let (mut parens, mut cases) = (0i32, 0i32);
    let mut operators = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let tok = &tokens[i];
        let is_operator = match &tok.token {
            Token::Word(w) => {
                w.quote_style.is_none()
                    && matches!(
                        w.keyword,
                        Keyword::AND | Keyword::OR | Keyword::NOT | Keyword::IS | Keyword::FOR
                    )
            }
            Token::Whitespace(_)
            | Token::Number(..)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::Comma
            | Token::LParen
            | Token::RParen
            | Token::Period
            | Token::SemiColon
            | Token::EOF => false,
            _ => true,
        };
        if is_operator {
            operators += 1;
            if operators > MAX_OPERATORS {
                return Err(CompileError {
                    position: at(tok.span.start),
                    kind: CompileErrorKind::Unsupported(format!(
                        "rules with more than {MAX_OPERATORS} operators"
                    )),
                });
            }
        }
        let in_clear = pass.clear.is_some();
        let out = match &mut pass.clear {
            Some((_, t)) => t,
            None => &mut pass.main,
        };
        match &tok.token {
            Token::Placeholder(p) => {
                return Err(CompileError {
                    position: at(tok.span.start),
                    kind: CompileErrorKind::Unsupported(format!("placeholder `{p}`")),
                })
            }
            Token::Number(n, _) => {
                if let Some((text, span, after)) = duration_at(i) {
                    out.push(TokenWithSpan::new(Token::SingleQuotedString(text), span));
                    i = after;
                    continue;
                }
                // A number glued to any other word is never valid SQL; it
                // is almost surely a duration with a wrong unit.
                if let Some(TokenWithSpan {
                    token: Token::Word(w),
                    span,
                }) = tokens.get(i + 1)
                {
                    if w.quote_style.is_none() && span.start == tok.span.end {
                        return Err(CompileError {
                            position: at(tok.span.start),
                            kind: CompileErrorKind::BadDuration {
                                text: format!("{n}{}", w.value),
                                reason: "unknown unit (use ms, s, m, h or d)",
                            },
                        });
                    }
                }
            }
            Token::LParen => parens += 1,
            Token::RParen => parens -= 1,
            Token::Word(w) if w.quote_style.is_none() => match w.keyword {
                Keyword::CASE => cases += 1,
                Keyword::END => cases -= 1,
                Keyword::FOR => {
                    let Some(j) = next_sig(i + 1) else {
                        return Err(CompileError {
                            position: at(tok.span.start),
                            kind: CompileErrorKind::Misplaced(
                                "FOR needs a duration, e.g. `temperature > 85 FOR 30s`".into(),
                            ),
                        });
                    };
                    let (text, span, after) = match (&tokens[j].token, duration_at(j)) {
                        (_, Some(d)) => d,
                        (Token::SingleQuotedString(s), None) => (s.clone(), tokens[j].span, j + 1),
                        (other, None) => {
                            return Err(CompileError {
                                position: at(tokens[j].span.start),
                                kind: CompileErrorKind::BadDuration {
                                    text: other.to_string(),
                                    reason: "FOR needs a duration with a unit, e.g. FOR 30s",
                                },
                            })
                        }
                    };
                    let ms = duration::parse(&text).map_err(|reason| CompileError {
                        position: at(span.start),
                        kind: CompileErrorKind::BadDuration {
                            text: text.clone(),
                            reason,
                        },
                    })?;
                    for kw in ["IS", "DISTINCT", "FROM"] {
                        out.push(TokenWithSpan::new(Token::make_keyword(kw), tok.span));
                        out.push(TokenWithSpan::new(
                            Token::Whitespace(sqlparser::tokenizer::Whitespace::Space),
                            tok.span,
                        ));
                    }
                    out.push(TokenWithSpan::new(
                        Token::Placeholder(format!("{FOR_MARKER}{}", pass.durations.len())),
                        span,
                    ));
                    pass.durations.push(ms);
                    i = after;
                    continue;
                }
                Keyword::FROM if parens == 0 && !in_clear => {
                    if let Some(j) = next_sig(i + 1) {
                        if matches!(tokens[j].token, Token::SingleQuotedString(_)) {
                            pass.from_span = Some(tokens[j].span);
                        }
                    }
                }
                _ if w.value.eq_ignore_ascii_case("CLEAR") && parens == 0 && cases == 0 => {
                    if let Some(j) = next_sig(i + 1) {
                        if matches!(&tokens[j].token, Token::Word(w2) if w2.keyword == Keyword::WHEN && w2.quote_style.is_none())
                        {
                            if pass.clear.is_some() {
                                return Err(CompileError {
                                    position: at(tok.span.start),
                                    kind: CompileErrorKind::Misplaced(
                                        "CLEAR WHEN given twice".into(),
                                    ),
                                });
                            }
                            pass.clear = Some((tok.span.start, Vec::new()));
                            i = j + 1;
                            continue;
                        }
                    }
                }
                _ => {}
            },
            _ => {}
        }
        out.push(tok.clone());
        i += 1;
    }
    Ok(pass)
}

fn expect_end(parser: &Parser<'_>, map: &SourceMap<'_>) -> Result<(), CompileError> {
    let next = parser.peek_token();
    if next.token == Token::EOF {
        return Ok(());
    }
    Err(CompileError {
        position: map.position(next.span.start.line, next.span.start.column),
        kind: CompileErrorKind::Syntax(format!("unexpected `{}`", next.token)),
    })
}

/// sqlparser reports positions inside its message (`… at Line: 1, Column: 5`).
fn parser_error(e: ParserError, map: &SourceMap<'_>) -> CompileError {
    let msg = match e {
        ParserError::TokenizerError(m) | ParserError::ParserError(m) => m,
        ParserError::RecursionLimitExceeded => {
            return CompileError {
                position: map.position(1, 1),
                kind: CompileErrorKind::Syntax(format!(
                    "expression nested deeper than {MAX_DEPTH} levels"
                )),
            }
        }
    };
    if let Some(i) = msg.rfind(" at Line: ") {
        let tail = &msg[i + " at Line: ".len()..];
        if let Some((line, col)) = tail.split_once(", Column: ") {
            if let (Ok(line), Ok(col)) = (line.trim().parse(), col.trim().parse()) {
                return CompileError {
                    position: map.position(line, col),
                    kind: CompileErrorKind::Syntax(msg[..i].to_string()),
                };
            }
        }
    }
    // No location: sqlparser ran into the end of the text.
    CompileError {
        position: map.end(),
        kind: CompileErrorKind::Syntax(msg),
    }
}

fn unwrap_select(query: Query, map: &SourceMap<'_>) -> Result<Select, CompileError> {
    let span = query.span();
    let unsupported = |what: &str| CompileError {
        position: map.position(span.start.line, span.start.column),
        kind: CompileErrorKind::Unsupported(what.to_string()),
    };
    if query.with.is_some() {
        return Err(unsupported("WITH"));
    }
    if query.order_by.is_some() {
        return Err(unsupported("ORDER BY"));
    }
    if query.limit_clause.is_some() || query.fetch.is_some() {
        return Err(unsupported("LIMIT/FETCH"));
    }
    if !query.locks.is_empty()
        || query.for_clause.is_some()
        || query.settings.is_some()
        || query.format_clause.is_some()
        || !query.pipe_operators.is_empty()
    {
        return Err(unsupported("query modifiers"));
    }
    match *query.body {
        SetExpr::Select(select) => Ok(*select),
        SetExpr::Query(_) => Err(unsupported("a parenthesized query")),
        SetExpr::SetOperation { .. } => Err(unsupported("UNION/INTERSECT/EXCEPT")),
        _ => Err(unsupported("only SELECT rules")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(sql: &str) -> Parsed {
        parse(sql, &SourceMap::new(sql)).expect("parses")
    }

    #[test]
    fn durations_and_for() {
        let p = parse_ok(
            "SELECT device FROM 'devices/+/t' GROUP BY device, TUMBLING(10s) HAVING avg(x) > 1 FOR 30s OR max(y) > 2",
        );
        assert_eq!(p.durations, vec![30_000]);
        assert_eq!(p.from_span.map(|s| s.start.column), Some(20));
        let having = p.select.having.expect("having").to_string();
        assert!(having.contains("IS DISTINCT FROM $for0 OR"), "{having}");
    }

    #[test]
    fn clear_when() {
        let p = parse_ok("SELECT * FROM 'a' WHERE t > 85 CLEAR WHEN t < 75");
        let (clear, loc) = p.clear.expect("clear");
        assert_eq!(clear.to_string(), "t < 75");
        assert_eq!((loc.line, loc.column), (1, 32));
        assert_eq!(p.select.selection.expect("where").to_string(), "t > 85");
        // Inside CASE, a field named `clear` is not the clause.
        let p = parse_ok("SELECT CASE clear WHEN 1 THEN 2 END FROM 'a'");
        assert!(p.clear.is_none());
    }

    #[test]
    fn errors_have_positions() {
        let sql = "SELECT x FROM 'a'\nWHERE x > > 3";
        let e = parse(sql, &SourceMap::new(sql)).err().expect("error");
        assert_eq!((e.position.line, e.position.column), (2, 11));
        assert_eq!(&sql[e.position.offset..e.position.offset + 1], ">");
        let sql = "SELECT x FROM 'a' WHERE x > $1";
        let e = parse(sql, &SourceMap::new(sql)).err().expect("error");
        assert!(matches!(e.kind, CompileErrorKind::Unsupported(_)));
        let sql = "SELECT x FROM 'a' WHERE x > 1 FOR 10y";
        let e = parse(sql, &SourceMap::new(sql)).err().expect("error");
        assert!(
            matches!(e.kind, CompileErrorKind::BadDuration { .. }),
            "{e}"
        );
        assert_eq!(e.position.column, 35);
    }
}
