//! The ACL file (`auth.acl_file`): TOML, one `[[rule]]` table per rule, checked in order,
//! the first matching rule deciding (`auth.acl_nomatch` when none does):
//!
//! ```toml
//! [[rule]]
//! permission = "deny"              # allow | deny
//! action = "subscribe"             # publish | subscribe | pubsub
//! topics = ["test/nosubscribe"]    # filters; %u and %c expand; "eq a/#" is that filter only
//! # whom: none of these = every client; else exactly one of
//! # user = "alice" | clientid = "dev-1" | ipaddr = "10.0.0.0/8"
//! ```
//!
//! Read at start (a file that cannot be read or parsed stops it, naming the rule) and again on
//! reload, when every shard gets the new rules.

use crate::core::acl::{Acl, Action, IpNet, Pattern, Permission, Rule, Subject};
use serde::Deserialize;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    permission: String,
    action: String,
    topics: Vec<String>,
    user: Option<String>,
    clientid: Option<String>,
    ipaddr: Option<String>,
}

/// Checks a rule's topic filter: not empty, `#` only as a whole last level, `+` only as a
/// whole level (after `%u`/`%c` placeholders, which stand for one level's text).
fn check_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("an empty topic".into());
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return Err(format!("{f:?}: '#' must be a whole last level"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("{f:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

fn rule(n: usize, r: RawRule) -> Result<Rule, String> {
    let at = |e: String| format!("rule {n}: {e}");
    let permission = match r.permission.as_str() {
        "allow" => Permission::Allow,
        "deny" => Permission::Deny,
        p => return Err(at(format!("permission {p:?} is not allow or deny"))),
    };
    let action = match r.action.as_str() {
        "publish" => Action::Publish,
        "subscribe" => Action::Subscribe,
        "pubsub" => Action::PubSub,
        a => {
            return Err(at(format!(
                "action {a:?} is not publish, subscribe or pubsub"
            )))
        }
    };
    let subject = match (r.user, r.clientid, r.ipaddr) {
        (None, None, None) => Subject::All,
        (Some(u), None, None) => Subject::User(u),
        (None, Some(c), None) => Subject::ClientId(c),
        (None, None, Some(ip)) => Subject::Net(IpNet::parse(&ip).map_err(at)?),
        _ => return Err(at("give at most one of user, clientid, ipaddr".into())),
    };
    if r.topics.is_empty() {
        return Err(at("topics is empty".into()));
    }
    let mut topics = Vec::with_capacity(r.topics.len());
    for t in &r.topics {
        let p = Pattern::parse(t);
        match &p {
            Pattern::Eq(f) | Pattern::Filter(f) => check_filter(f).map_err(at)?,
        }
        topics.push(p);
    }
    Ok(Rule {
        permission,
        action,
        subject,
        topics,
    })
}

/// Parses the text of an ACL file.
pub fn parse(text: &str, nomatch: Permission) -> Result<Acl, String> {
    let file: File = toml::from_str(text).map_err(|e| match e.span() {
        Some(s) => format!(
            "line {}: {}",
            text[..s.start.min(text.len())].matches('\n').count() + 1,
            e.message()
        ),
        None => e.message().to_string(),
    })?;
    let rules = file
        .rule
        .into_iter()
        .enumerate()
        .map(|(i, r)| rule(i + 1, r))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Acl { rules, nomatch })
}

/// Reads the ACL file at `path`.
pub fn load(path: &Path, nomatch: Permission) -> Result<Acl, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text, nomatch).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_shape_parses() {
        let acl = parse(
            r##"
[[rule]]
permission = "allow"
action = "pubsub"
topics = ["devices/%c/#", "eq status/#"]
clientid = "dev-1"

[[rule]]
permission = "deny"
action = "subscribe"
topics = ["#"]
ipaddr = "10.0.0.0/8"

[[rule]]
permission = "allow"
action = "publish"
topics = ["users/%u/+"]
user = "alice"
"##,
            Permission::Deny,
        )
        .unwrap();
        assert_eq!(acl.rules.len(), 3);
        assert_eq!(acl.rules[0].topics[1], Pattern::Eq("status/#".into()));
        assert_eq!(acl.rules[2].subject, Subject::User("alice".into()));
        assert_eq!(acl.nomatch, Permission::Deny);
        assert!(parse("", Permission::Allow).unwrap().rules.is_empty());
    }

    #[test]
    fn errors_name_the_rule() {
        for (text, want) in [
            ("[[rule]]\npermission = \"maybe\"\naction = \"publish\"\ntopics = [\"a\"]\n", "rule 1: permission"),
            ("[[rule]]\npermission = \"allow\"\naction = \"read\"\ntopics = [\"a\"]\n", "rule 1: action"),
            ("[[rule]]\npermission = \"allow\"\naction = \"publish\"\ntopics = []\n", "topics is empty"),
            ("[[rule]]\npermission = \"allow\"\naction = \"publish\"\ntopics = [\"a/#/b\"]\n", "'#'"),
            ("[[rule]]\npermission = \"allow\"\naction = \"publish\"\ntopics = [\"a+\"]\n", "'+'"),
            ("[[rule]]\npermission = \"allow\"\naction = \"publish\"\ntopics = [\"a\"]\nuser = \"x\"\nclientid = \"y\"\n", "at most one"),
            ("[[rule]]\npermission = \"allow\"\naction = \"publish\"\ntopics = [\"a\"]\nipaddr = \"nope\"\n", "not an address"),
            ("[[rule]]\npermission = \"allow\"\naction = \"publish\"\ntopics = [\"a\"]\ncolour = \"red\"\n", "colour"),
        ] {
            let e = parse(text, Permission::Allow).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
