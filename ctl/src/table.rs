//! Aligned plain-text tables for people, and the small formatting helpers
//! the views share (ages, enum names).
//!
//! A table is a header and rows of cells; each column is as wide as its
//! widest cell, columns are two spaces apart, and the last column is not
//! padded (no trailing blanks). A cell never holds a line break: one is
//! shown as a space, so that a reason a node composed cannot break the
//! alignment. Numbers are right-aligned when the column says so.

/// Longest cell shown, in characters; longer text (a reason, a detail) is
/// cut with an ellipsis. `--json` always carries the whole text.
pub const CELL_CHARS_MAX: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table { columns: columns.to_vec(), rows: Vec::new() }
    }

    /// Adds a row; it must have one cell per column.
    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.columns.len(), "a row has one cell per column");
        self.rows.push(cells.into_iter().map(|cell| clean(&cell)).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table, one line per row after the header, each ending in '\n'.
    pub fn render(&self) -> String {
        let header: Vec<String> = self.columns.iter().map(|(name, _)| name.to_string()).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let last = i + 1 == row.len();
                let pad = widths[i] - cell.chars().count();
                if i > 0 {
                    line.push_str("  ");
                }
                match self.columns[i].1 {
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                    Align::Left => {
                        line.push_str(cell);
                        if !last {
                            line.extend(std::iter::repeat_n(' ', pad));
                        }
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// One line, at most [`CELL_CHARS_MAX`] characters.
fn clean(cell: &str) -> String {
    let one_line: String = cell.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if one_line.chars().count() <= CELL_CHARS_MAX {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(CELL_CHARS_MAX - 1).collect();
    cut.push('…');
    cut
}

/// A duration for a person: `850ms`, `4.2s`, `3m05s`, `2h07m`, `3d04h`.
pub fn age(ms: u64) -> String {
    const S: u64 = 1_000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;
    const D: u64 = 24 * H;
    match ms {
        ms if ms < S => format!("{ms}ms"),
        ms if ms < M => format!("{}.{}s", ms / S, ms % S / 100),
        ms if ms < H => format!("{}m{:02}s", ms / M, ms % M / S),
        ms if ms < D => format!("{}h{:02}m", ms / H, ms % H / M),
        ms => format!("{}d{:02}h", ms / D, ms % D / H),
    }
}

/// A protobuf enum value's name without its type prefix, lower case:
/// `TRANSACTION_STATE_COMMITTED` → `committed`. An unknown number (a newer
/// server) is shown as `unknown(N)` rather than guessed.
pub fn enum_name(name: Option<&str>, prefix: &str, number: i32) -> String {
    match name {
        Some(name) => name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase(),
        None => format!("unknown({number})"),
    }
}

/// `yes` or nothing: a flag column that draws the eye only when set.
pub fn flag(set: bool) -> String {
    if set { "yes" } else { "" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_have_no_trailing_blanks() {
        let mut table = Table::new(&[("NODE", Align::Left), ("COUNT", Align::Right), ("NOTE", Align::Left)]);
        table.row(vec!["p1".into(), "7".into(), "".into()]);
        table.row(vec!["coordinator".into(), "1234".into(), "two\nlines".into()]);
        assert_eq!(
            table.render(),
            "NODE         COUNT  NOTE\n\
             p1               7\n\
             coordinator   1234  two lines\n"
        );
    }

    #[test]
    fn long_cells_are_cut() {
        let mut table = Table::new(&[("A", Align::Left)]);
        table.row(vec!["x".repeat(500)]);
        let line = table.render().lines().nth(1).unwrap().to_string();
        assert_eq!(line.chars().count(), CELL_CHARS_MAX);
        assert!(line.ends_with('…'));
    }

    #[test]
    fn ages_read_like_a_person_would_write_them() {
        assert_eq!(age(0), "0ms");
        assert_eq!(age(999), "999ms");
        assert_eq!(age(4_250), "4.2s");
        assert_eq!(age(185_000), "3m05s");
        assert_eq!(age(2 * 3_600_000 + 7 * 60_000), "2h07m");
        assert_eq!(age(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    }

    #[test]
    fn enum_names_lose_their_prefix() {
        assert_eq!(enum_name(Some("TRANSACTION_STATE_COMMITTED"), "TRANSACTION_STATE_", 3), "committed");
        assert_eq!(enum_name(None, "TRANSACTION_STATE_", 42), "unknown(42)");
    }
}
