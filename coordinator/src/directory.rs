//! Which participant owns which account: the coordinator's directory.
//!
//! Each participant is configured as `NAME=URL@FIRST..END` and owns the
//! account ids from FIRST (inclusive) to END (exclusive). Ranges may not
//! overlap; an account in no range is unknown.

use std::collections::BTreeMap;
use tandem::domain::{AccountId, Id};
use tandem::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub participant: Id,
    pub url: String,
    pub first: AccountId,
    pub end: AccountId,
}

impl Shard {
    /// Parses `NAME=URL@FIRST..END`.
    pub fn parse(text: &str) -> Result<Shard, Error> {
        let bad = |why: &str| Error::InvalidInput(format!("participant {text:?}: {why}; expected NAME=URL@FIRST..END"));
        let (name, rest) = text.split_once('=').ok_or_else(|| bad("no '='"))?;
        let (url, range) = rest.rsplit_once('@').ok_or_else(|| bad("no '@'"))?;
        let range = tandem::domain::parse_account_range(range).map_err(|why| bad(&why))?;
        let (first, end) = (range.start, range.end);
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad("the URL must start with http:// or https://"));
        }
        Ok(Shard { participant: Id::parse("participant name", name)?, url: url.to_string(), first, end })
    }
}

#[derive(Debug, Clone)]
pub struct Directory {
    /// By the first account of each range.
    ranges: BTreeMap<AccountId, Shard>,
}

impl Directory {
    pub fn new(shards: Vec<Shard>) -> Result<Directory, Error> {
        if shards.is_empty() {
            return Err(Error::InvalidInput("the directory needs at least one participant".into()));
        }
        let mut ranges = BTreeMap::new();
        let mut names = std::collections::BTreeSet::new();
        for shard in shards {
            if !names.insert(shard.participant.clone()) {
                return Err(Error::InvalidInput(format!("participant {} is listed twice", shard.participant)));
            }
            ranges.insert(shard.first, shard);
        }
        let list: Vec<&Shard> = ranges.values().collect();
        for pair in list.windows(2) {
            if pair[0].end > pair[1].first {
                return Err(Error::InvalidInput(format!(
                    "the account ranges of {} and {} overlap",
                    pair[0].participant, pair[1].participant
                )));
            }
        }
        Ok(Directory { ranges })
    }

    /// The participant that owns `account`.
    pub fn owner(&self, account: AccountId) -> Result<&Id, Error> {
        match self.ranges.range(..=account).next_back() {
            Some((_, shard)) if account < shard.end => Ok(&shard.participant),
            _ => Err(Error::NotFound(format!("account {account} is in no participant's range of the directory"))),
        }
    }

    pub fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.ranges.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_route() {
        let p1 = Shard::parse("p1=http://127.0.0.1:7101@0..100").unwrap();
        let p2 = Shard::parse("p2=http://127.0.0.1:7102@100..200").unwrap();
        let directory = Directory::new(vec![p2, p1]).unwrap();
        assert_eq!(directory.owner(0).unwrap().as_str(), "p1");
        assert_eq!(directory.owner(99).unwrap().as_str(), "p1");
        assert_eq!(directory.owner(100).unwrap().as_str(), "p2");
        assert!(matches!(directory.owner(200), Err(Error::NotFound(_))));
    }

    #[test]
    fn bad_shards_are_refused_with_a_reason() {
        for bad in ["p1", "p1=http://x", "p1=http://x@5..5", "p1=ftp://x@0..5", "p 1=http://x@0..5", "p1=http://x@a..5"]
        {
            assert!(matches!(Shard::parse(bad), Err(Error::InvalidInput(_))), "{bad}");
        }
        let a = Shard::parse("p1=http://x@0..10").unwrap();
        let b = Shard::parse("p2=http://y@5..20").unwrap();
        assert!(Directory::new(vec![a.clone(), b]).is_err());
        assert!(Directory::new(vec![a.clone(), a]).is_err());
    }
}
