//! Per-key window state.
//!
//! **Tumbling and hopping** windows share one structure: time is cut into
//! panes of `gcd(size, hop)` aligned to the epoch, each pane holds one
//! aggregate state per aggregate of the rule, and the window ending at each
//! multiple of `hop` is the merge of the panes it covers (a tumbling window
//! is one pane). A value is folded into its pane in O(aggregates); a window
//! closes when the key's own messages or a clock tick pass its end, and
//! panes no later window needs are dropped (their memory reused for the
//! next pane). A value for a window already emitted is *late* and refused.
//!
//! **Sliding** windows (the last `size` before each message) keep a
//! two-stack queue of aggregate states: the back stack takes new values
//! and keeps a running merge; the front stack holds, per entry, the merge
//! of itself and everything newer, so evicting the oldest is a pop and the
//! whole window is `front.top ⊕ back.total`, all in amortized O(aggregates)
//! per value without ever subtracting (min and max cannot subtract, and
//! floating-point sums should not).

use std::collections::VecDeque;

use crate::aggregate::AggState;
use crate::plan::WindowSpec;

/// Pane geometry of a tumbling or hopping window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Panes {
    pane: i64,
    size: i64,
    hop: i64,
}

impl Panes {
    pub(crate) fn of(spec: WindowSpec) -> Option<Panes> {
        match spec {
            WindowSpec::Tumbling { size } => Some(Panes {
                pane: size,
                size,
                hop: size,
            }),
            WindowSpec::Hopping { size, hop } => Some(Panes {
                pane: gcd(size, hop),
                size,
                hop,
            }),
            WindowSpec::Sliding { .. } => None,
        }
    }
}

/// One key's panes.
#[derive(Debug, Clone, Default)]
pub(crate) struct PaneState {
    panes: VecDeque<(i64, Box<[AggState]>)>,
    /// End of the next window to emit.
    next_end: i64,
    /// A dropped pane's states, reused for the next pane.
    spare: Option<Box<[AggState]>>,
}

impl PaneState {
    pub(crate) fn new(g: &Panes, ts: i64) -> PaneState {
        PaneState {
            panes: VecDeque::new(),
            next_end: ts.div_euclid(g.hop) * g.hop + g.hop,
            spare: None,
        }
    }

    /// The states of the pane holding `ts`, or `None` when every window
    /// containing `ts` has already been emitted (late).
    pub(crate) fn pane_for(
        &mut self,
        g: &Panes,
        ts: i64,
        template: &[AggState],
    ) -> Option<&mut [AggState]> {
        let start = ts.div_euclid(g.pane) * g.pane;
        if start < self.next_end - g.size {
            return None;
        }
        let i = match self.panes.binary_search_by_key(&start, |p| p.0) {
            Ok(i) => i,
            Err(i) => {
                let states = match self.spare.take() {
                    Some(mut s) => {
                        s.clone_from_slice(template);
                        s
                    }
                    None => template.to_vec().into_boxed_slice(),
                };
                self.panes.insert(i, (start, states));
                i
            }
        };
        self.panes.get_mut(i).map(|p| &mut *p.1)
    }

    /// Close the next window ending at or before `now`: its merged states
    /// go to `out` (reset from `template` first); returns its bounds.
    pub(crate) fn pop_due(
        &mut self,
        g: &Panes,
        now: i64,
        template: &[AggState],
        out: &mut [AggState],
    ) -> Option<(i64, i64)> {
        let first = self.panes.front()?.0;
        // Skip windows that hold no pane (the key was quiet).
        self.next_end = self.next_end.max(first.div_euclid(g.hop) * g.hop + g.hop);
        if self.next_end > now {
            return None;
        }
        let (start, end) = (self.next_end - g.size, self.next_end);
        out.clone_from_slice(template);
        for (pane_start, states) in &self.panes {
            if *pane_start >= end {
                break;
            }
            if *pane_start >= start {
                for (o, s) in out.iter_mut().zip(states.iter()) {
                    o.merge(s);
                }
            }
        }
        self.next_end += g.hop;
        while self
            .panes
            .front()
            .is_some_and(|p| p.0 < self.next_end - g.size)
        {
            if let Some((_, states)) = self.panes.pop_front() {
                self.spare = Some(states);
            }
        }
        Some((start, end))
    }

    /// Whether no pane holds data.
    pub(crate) fn is_empty(&self) -> bool {
        self.panes.is_empty()
    }

    /// When the next window with data closes.
    pub(crate) fn next_due(&self, g: &Panes) -> Option<i64> {
        let first = self.panes.front()?.0;
        Some(self.next_end.max(first.div_euclid(g.hop) * g.hop + g.hop))
    }
}

/// One key's sliding window.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlidingState {
    n: usize,
    /// Newest at index 0, oldest on top; entry i holds the merge of
    /// entries 0..=i.
    front_ts: Vec<i64>,
    front: Vec<AggState>,
    /// Raw per-value states in arrival order, and their running merge.
    back_ts: Vec<i64>,
    back: Vec<AggState>,
    back_total: Vec<AggState>,
}

impl SlidingState {
    pub(crate) fn new(template: &[AggState]) -> SlidingState {
        SlidingState {
            n: template.len(),
            back_total: template.to_vec(),
            ..SlidingState::default()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.front_ts.len() + self.back_ts.len()
    }

    pub(crate) fn oldest(&self) -> Option<i64> {
        self.front_ts.last().or(self.back_ts.first()).copied()
    }

    pub(crate) fn newest(&self) -> Option<i64> {
        self.back_ts.last().or(self.front_ts.first()).copied()
    }

    /// Append one value's states (one per aggregate).
    pub(crate) fn push(&mut self, ts: i64, raw: &[AggState]) {
        self.back_ts.push(ts);
        self.back.extend_from_slice(raw);
        for (t, r) in self.back_total.iter_mut().zip(raw) {
            t.merge(r);
        }
    }

    /// Drop the oldest value.
    pub(crate) fn pop_oldest(&mut self, template: &[AggState]) -> bool {
        if self.front_ts.is_empty() {
            self.flip(template);
        }
        if self.front_ts.pop().is_none() {
            return false;
        }
        self.front.truncate(self.front_ts.len() * self.n);
        true
    }

    /// Drop values at or before `cutoff`; returns how many.
    pub(crate) fn evict(&mut self, cutoff: i64, template: &[AggState]) -> usize {
        let mut dropped = 0;
        while self.oldest().is_some_and(|t| t <= cutoff) && self.pop_oldest(template) {
            dropped += 1;
        }
        dropped
    }

    /// The merge of the whole window into `out`.
    pub(crate) fn total(&self, template: &[AggState], out: &mut [AggState]) {
        out.clone_from_slice(template);
        if let Some(top) = self.front.len().checked_sub(self.n) {
            for (o, s) in out.iter_mut().zip(&self.front[top..]) {
                o.merge(s);
            }
        }
        for (o, s) in out.iter_mut().zip(&self.back_total) {
            o.merge(s);
        }
    }

    /// Move the back stack onto the (empty) front stack, newest first.
    fn flip(&mut self, template: &[AggState]) {
        let n = self.n;
        for j in (0..self.back_ts.len()).rev() {
            let base = self.front.len();
            self.front.extend_from_slice(&self.back[j * n..(j + 1) * n]);
            if base >= n {
                let (older, cur) = self.front.split_at_mut(base);
                for (c, p) in cur.iter_mut().zip(&older[base - n..]) {
                    c.merge(p);
                }
            }
            self.front_ts.push(self.back_ts[j]);
        }
        self.back_ts.clear();
        self.back.clear();
        self.back_total.clone_from_slice(template);
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AggFunc;
    use crate::value::Val;

    const FUNCS: [AggFunc; 3] = [AggFunc::Sum, AggFunc::Min, AggFunc::Count];

    fn template() -> Vec<AggState> {
        FUNCS.iter().map(|f| f.empty()).collect()
    }

    fn finish(states: &[AggState]) -> Vec<Val<'static>> {
        states.iter().zip(FUNCS).map(|(s, f)| s.finish(f)).collect()
    }

    fn add(p: &mut PaneState, g: &Panes, ts: i64, x: f64) -> bool {
        let t = template();
        match p.pane_for(g, ts, &t) {
            Some(states) => {
                for s in states.iter_mut() {
                    s.add(ts, &Val::Num(x));
                }
                true
            }
            None => false,
        }
    }

    fn drain(p: &mut PaneState, g: &Panes, now: i64) -> Vec<((i64, i64), Vec<Val<'static>>)> {
        let t = template();
        let mut out = template();
        let mut got = Vec::new();
        while let Some(b) = p.pop_due(g, now, &t, &mut out) {
            got.push((b, finish(&out)));
        }
        got
    }

    #[test]
    fn tumbling_windows_and_lateness() {
        let g = Panes::of(WindowSpec::Tumbling { size: 10 }).expect("panes");
        let mut p = PaneState::new(&g, 3);
        assert!(add(&mut p, &g, 3, 1.0));
        assert!(add(&mut p, &g, 9, 2.0));
        assert!(add(&mut p, &g, 12, 5.0));
        assert_eq!(p.next_due(&g), Some(10));
        let got = drain(&mut p, &g, 10);
        assert_eq!(
            got,
            vec![((0, 10), vec![Val::Num(3.0), Val::Num(1.0), Val::Num(2.0)])]
        );
        assert!(!add(&mut p, &g, 8, 9.0), "window [0,10) is closed: late");
        // A quiet gap: the next window with data is [40, 50).
        assert!(add(&mut p, &g, 45, 7.0));
        let got = drain(&mut p, &g, 100);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, (10, 20));
        assert_eq!(
            got[1],
            ((40, 50), vec![Val::Num(7.0), Val::Num(7.0), Val::Num(1.0)])
        );
        assert_eq!(p.next_due(&g), None);
    }

    #[test]
    fn hopping_windows_overlap() {
        let g = Panes::of(WindowSpec::Hopping { size: 10, hop: 5 }).expect("panes");
        let mut p = PaneState::new(&g, 0);
        for ts in [1, 6, 11] {
            assert!(add(&mut p, &g, ts, ts as f64));
        }
        let got = drain(&mut p, &g, 20);
        let bounds: Vec<_> = got.iter().map(|g| g.0).collect();
        assert_eq!(bounds, vec![(-5, 5), (0, 10), (5, 15), (10, 20)]);
        let sums: Vec<_> = got.iter().map(|g| g.1[0].clone()).collect();
        assert_eq!(
            sums,
            vec![Val::Num(1.0), Val::Num(7.0), Val::Num(17.0), Val::Num(11.0)]
        );
        // ts 12 is still in [10, 20)? No: that window was emitted; [15, 25) starts later.
        assert!(!add(&mut p, &g, 12, 1.0));
        assert!(add(&mut p, &g, 16, 1.0));
    }

    #[test]
    fn sliding_two_stacks() {
        let t = template();
        let mut s = SlidingState::new(&t);
        let mut out = template();
        let raw = |x: f64| -> Vec<AggState> {
            let mut r = template();
            for st in r.iter_mut() {
                st.add(0, &Val::Num(x));
            }
            r
        };
        for (ts, x) in [(1, 5.0), (2, 3.0), (3, 8.0), (4, 1.0)] {
            s.push(ts, &raw(x));
        }
        s.total(&t, &mut out);
        assert_eq!(
            finish(&out),
            vec![Val::Num(17.0), Val::Num(1.0), Val::Num(4.0)]
        );
        assert_eq!(s.evict(2, &t), 2);
        s.total(&t, &mut out);
        assert_eq!(
            finish(&out),
            vec![Val::Num(9.0), Val::Num(1.0), Val::Num(2.0)]
        );
        s.push(5, &raw(0.5));
        assert_eq!(s.evict(3, &t), 1);
        s.total(&t, &mut out);
        assert_eq!(
            finish(&out),
            vec![Val::Num(1.5), Val::Num(0.5), Val::Num(2.0)]
        );
        assert_eq!((s.oldest(), s.newest(), s.len()), (Some(4), Some(5), 2));
        assert_eq!(s.evict(10, &t), 2);
        s.total(&t, &mut out);
        assert_eq!(finish(&out), vec![Val::Null, Val::Null, Val::Num(0.0)]);
    }
}
