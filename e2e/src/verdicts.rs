//! A table of attempts and what came of each, for suites that throw many things at the
//! system and must report every wrong answer, not only the first: each [`Verdicts::check`]
//! is a row, [`Verdicts::finish`] prints them all and fails naming the wrong ones.

/// One attempt and what came of it.
struct Row {
    what: String,
    expected: &'static str,
    seen: String,
    ok: bool,
}

#[derive(Default)]
pub struct Verdicts(Vec<Row>);

impl Verdicts {
    /// Records `what` was tried, `expected` what should have happened, `ok` whether it
    /// did, and `seen` what came back (shortened to a line).
    pub fn check(
        &mut self,
        what: impl Into<String>,
        expected: &'static str,
        ok: bool,
        seen: String,
    ) {
        self.0.push(Row {
            what: what.into(),
            expected,
            seen: seen.replace(['\n', '|'], " ").chars().take(90).collect(),
            ok,
        });
    }

    /// Prints every row as a Markdown table, then fails if any went wrong.
    pub fn finish(self) {
        println!("| attempt | expected | ok | seen |");
        println!("|---|---|---|---|");
        for row in &self.0 {
            let ok = if row.ok { "ok" } else { "FAIL" };
            println!("| {} | {} | {ok} | {} |", row.what, row.expected, row.seen);
        }
        let failed: Vec<&str> = self
            .0
            .iter()
            .filter(|row| !row.ok)
            .map(|row| row.what.as_str())
            .collect();
        assert!(failed.is_empty(), "wrong answers: {failed:#?}");
    }
}
