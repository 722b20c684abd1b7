//! Where a message lives in the stream: one subject per id, `messages.<token>`, so the
//! stream itself can refuse a second message for an id (appends rely on it).

/// Every message's subject starts with this.
pub(super) const SUBJECT_PREFIX: &str = "messages.";

/// Ids become one subject token: kept as they are when they are plain
/// (`[A-Za-z0-9-]`, as uuids are), hex-encoded behind `_` otherwise. No plain id
/// contains `_`, so two ids never share a token.
pub fn subject_for(id: &str) -> String {
    let plain = id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if plain {
        format!("{SUBJECT_PREFIX}{id}")
    } else {
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{SUBJECT_PREFIX}_{hex}")
    }
}

/// The id whose subject is `subject` (the inverse of [`subject_for`]). A token that is
/// not valid hex, or not UTF-8 once decoded, is given back as it is.
pub fn id_of(subject: &str) -> String {
    let token = subject.strip_prefix(SUBJECT_PREFIX).unwrap_or(subject);
    let Some(hex) = token.strip_prefix('_') else {
        return token.to_owned();
    };
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect();
    bytes
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_else(|| token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_token_never_collide_and_give_the_id_back() {
        assert_eq!(subject_for("0b1c-9f"), "messages.0b1c-9f");
        assert_eq!(subject_for("a.b"), "messages._612e62");
        assert_ne!(subject_for("_61"), subject_for("a"));
        for id in ["a.b", "a b", "a*b", "x>y", "ünï", "_61", "0b1c-9f", "A-z"] {
            let subject = subject_for(id);
            let token = subject.trim_start_matches(SUBJECT_PREFIX);
            assert!(!token.contains(['.', '*', '>', ' ']), "{id} -> {token}");
            assert_eq!(id_of(&subject), id, "{subject}");
        }
    }
}
