//! Column-aligned text tables, as kubectl and istioctl print them: each column as wide as
//! its widest cell, three spaces between columns, no trailing blanks.

/// The rows (the first is the header) as lines.
pub fn render<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            line.push_str(cell);
            if i + 1 < N {
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_align_on_the_widest_cell() {
        let rows = [
            ["NAME".to_owned(), "IP".to_owned(), "X".to_owned()],
            [
                "a-long-name".to_owned(),
                "10.0.0.1".to_owned(),
                String::new(),
            ],
        ];
        assert_eq!(
            super::render(&rows),
            "NAME          IP         X\na-long-name   10.0.0.1\n"
        );
    }
}
