//! The one rule for ids (clusters, instances, operations, snapshots, nodes, replicas):
//! 1 to 128 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or digit. Ids name
//! directories and appear in URLs and cookies, so `.`, `..` and separators are out.

/// Longest id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Checks `value`; the error says what is wrong and what is accepted.
pub fn check(value: &str) -> Result<(), String> {
    const RULE: &str =
        "expected 1-128 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit";
    if value.is_empty() {
        return Err(format!("must not be empty; {RULE}"));
    }
    if value.len() > MAX_ID_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_ID_LEN} accepted",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("'{value}' contains {c:?}; {RULE}"));
    }
    if !value.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "'{value}' must start with a letter or digit; {RULE}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_name_other_directories_are_refused() {
        assert!(check("web-1.a_b").is_ok());
        for bad in ["", ".", "..", ".hidden", "-x", "a/b", "a b", "a~b"] {
            assert!(check(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            check(&"x".repeat(129))
                .expect_err("long")
                .contains("129 bytes")
        );
    }
}
