//! Topic names and filters: matching, wildcard detection, and the filters this broker refuses.
//!
//! Matching follows MQTT 3.1.1 section 4.7: `+` matches exactly one level, `#` matches any
//! number of levels including the parent (`a/#` matches `a`), and topics starting with `$` are
//! not matched by a wildcard in the first level.

/// Splits the first level off `rest`: (level, the rest after its `/`, if any). A byte search:
/// `/` is ASCII, so it never splits a UTF-8 sequence.
pub fn split_level(rest: &str) -> (&str, Option<&str>) {
    match rest.as_bytes().iter().position(|&b| b == b'/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    }
}

/// The number of levels of a topic name or filter (`a/b` has 2, `a/` has 2, `` has 1).
pub fn levels(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

/// Whether `filter` contains a wildcard.
pub fn is_wildcard(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// Whether `filter` asks for a shared subscription (`$share/…` or `$queue/…`), which this
/// broker refuses until shared subscriptions exist.
pub fn is_shared(filter: &str) -> bool {
    filter.starts_with("$share/") || filter == "$share" || filter.starts_with("$queue/")
}

/// Whether `topic` matches `filter`. Both are assumed valid (checked by the codec).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `topic` is in the broker's `$SYS/` tree, where clients may not publish.
#[inline]
pub fn is_sys(topic: &str) -> bool {
    // Checked on every PUBLISH: one byte decides for almost all topics.
    let b = topic.as_bytes();
    b.first() == Some(&b'$') && b.get(1..4) == Some(b"SYS") && (b.len() == 4 || b[4] == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of MQTT 3.1.1 sections 4.7.1.2, 4.7.1.3 and 4.7.2.
    #[test]
    fn spec_examples() {
        let table = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("#", "sport/tennis", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("#", "$SYS/broker/uptime", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/broker/uptime", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a//c", true),
            ("ACCOUNTS", "Accounts", false),
        ];
        for (filter, topic, expected) in table {
            assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn levels_split_on_slash_only() {
        assert_eq!(split_level("a/b/c"), ("a", Some("b/c")));
        assert_eq!(split_level("a/"), ("a", Some("")));
        assert_eq!(split_level("/"), ("", Some("")));
        assert_eq!(split_level("é"), ("é", None));
    }

    #[test]
    fn shared_filters() {
        assert!(is_shared("$share/g/a"));
        assert!(is_shared("$queue/a"));
        assert!(!is_shared("$SYS/a"));
        assert!(!is_shared("share/a"));
    }

    #[test]
    fn the_sys_tree_is_sys_and_its_neighbours_are_not() {
        assert!(is_sys("$SYS"));
        assert!(is_sys("$SYS/broker/version"));
        assert!(!is_sys("$SYSTEM/x"));
        assert!(!is_sys("$sys/x"));
        assert!(!is_sys("a/$SYS/x"));
    }
}
