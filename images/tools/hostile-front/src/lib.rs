//! A hostile blkfront for stordom: it plays the frontend of a vbd from
//! dom0 with its own grants, event channel and xenstore nodes, and
//! attacks the backend through named cases ([`cases`]) and a seeded
//! random campaign ([`campaign`]), checking the outcome stordom must
//! produce for each. The attacks are written against [`dom0::Dom0`]: the
//! binary runs them under Xen (`linux`), the host tests against stordom's
//! blkback engine on the simulated Xen.

pub mod campaign;
pub mod cases;
pub mod dom0;
pub mod front;

/// The line the scenario runner checks: `RESULT name=hostile:<name>
/// status=pass|fail detail="..."`.
pub fn result_line(name: &str, result: &Result<String, String>) -> String {
    let (status, detail) = match result {
        Ok(detail) => ("pass", detail),
        Err(why) => ("fail", why),
    };
    let detail: String = detail
        .chars()
        .map(|c| if c == '"' || c.is_control() { '\'' } else { c })
        .collect();
    format!("RESULT name=hostile:{name} status={status} detail=\"{detail}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_keep_to_one_quoted_detail() {
        assert_eq!(
            result_line("bad_grant", &Ok("8 refused".into())),
            "RESULT name=hostile:bad_grant status=pass detail=\"8 refused\""
        );
        assert_eq!(
            result_line("x", &Err("node \"a\"\nnext".into())),
            "RESULT name=hostile:x status=fail detail=\"node 'a''next\""
        );
    }
}
