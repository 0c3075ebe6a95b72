//! Domain types shared by every node, validated once at the edge.
//!
//! Money is an `i64` count of minor units (cents). A [`Leg`] is one account's
//! part in a transaction: negative debits, positive credits. A transaction's
//! legs sum to zero: tandem moves money, it never makes or destroys it.

use crate::Error;
use std::collections::BTreeSet;
use std::fmt;

pub type AccountId = u64;
pub type Amount = i64;

/// Most legs in one transaction.
pub const LEGS_MAX: usize = 16;
/// Longest transaction id, participant id or idempotency key, in bytes.
pub const ID_LEN_MAX: usize = 64;
/// Most accounts opened by one OpenAccounts call.
pub const OPEN_ACCOUNTS_MAX: usize = 100_000;
/// Longest choreography event id, in bytes (a saga id and a suffix).
pub const EVENT_ID_LEN_MAX: usize = 2 * ID_LEN_MAX;
/// Longest reason a node takes from another (an event's, a participant's
/// answer), in bytes. A request with a longer one is refused; a longer one
/// in an answer is clipped ([`clip_text`]).
pub const REASON_LEN_MAX: usize = 1_024;
/// Longest reason a node stores, in bytes: a received reason with the
/// sentences this node adds to it (a dead letter's, an operator's). Kept
/// well below what a record's two-byte length can hold.
pub const REASON_STORED_LEN_MAX: usize = 4 * REASON_LEN_MAX;

/// A validated identifier: 1 to [`ID_LEN_MAX`] characters of
/// `[A-Za-z0-9._:-]`. Used for transaction ids, node ids and idempotency keys.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(String);

impl Id {
    pub fn parse(what: &str, text: &str) -> Result<Id, Error> {
        if text.is_empty() {
            return Err(Error::InvalidInput(format!("{what} is empty")));
        }
        if text.len() > ID_LEN_MAX {
            return Err(Error::InvalidInput(format!("{what} is {} bytes long; the most is {ID_LEN_MAX}", text.len())));
        }
        if let Some(bad) = text.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))) {
            return Err(Error::InvalidInput(format!(
                "{what} {text:?} has the character {bad:?}; only A-Z a-z 0-9 . _ : - are allowed"
            )));
        }
        Ok(Id(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

pub type TxnId = Id;

/// Checks a choreography event id: 1 to [`EVENT_ID_LEN_MAX`] characters of
/// the id alphabet (`[A-Za-z0-9._:-]`).
pub fn check_event_id(text: &str) -> Result<(), Error> {
    if text.is_empty() || text.len() > EVENT_ID_LEN_MAX {
        return Err(Error::InvalidInput(format!(
            "an event id has 1 to {EVENT_ID_LEN_MAX} characters; this one has {}",
            text.len()
        )));
    }
    if let Some(bad) = text.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))) {
        return Err(Error::InvalidInput(format!(
            "the event id has the character {bad:?}; only A-Z a-z 0-9 . _ : - are allowed"
        )));
    }
    Ok(())
}

/// Checks that the text `what` received in a request is at most `max` bytes.
pub fn check_text_len(what: &str, text: &str, max: usize) -> Result<(), Error> {
    if text.len() > max {
        return Err(Error::InvalidInput(format!("{what} is {} bytes long; the most is {max}", text.len())));
    }
    Ok(())
}

/// `text` cut to at most `max` bytes at a character boundary, marked as cut.
/// For a reason this node received in an answer or composes from several (a
/// request with a text too long is refused instead): stored reasons stay
/// within [`REASON_STORED_LEN_MAX`].
pub fn clip_text(text: &str, max: usize) -> String {
    const MARK: &str = " [cut]";
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

/// Parses an account range `FIRST..END` (END excluded, not empty): who owns
/// which accounts, in the coordinator's directory and a participant's flags.
pub fn parse_account_range(text: &str) -> Result<std::ops::Range<AccountId>, String> {
    let (first, end) = text.split_once("..").ok_or("no '..' in the account range")?;
    let first: AccountId = first.parse().map_err(|_| "FIRST is not a number")?;
    let end: AccountId = end.parse().map_err(|_| "END is not a number")?;
    if first >= end {
        return Err("the account range is empty".into());
    }
    Ok(first..end)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Leg {
    pub account: AccountId,
    pub amount: Amount,
}

impl Leg {
    pub fn is_debit(&self) -> bool {
        self.amount < 0
    }
}

/// Checks the shape of a set of legs: 1 to [`LEGS_MAX`], no zero amount, no
/// `i64::MIN` (its negation overflows), each account at most once. Whether
/// they sum to zero is the coordinator's rule (a participant sees only its
/// own share of a transaction).
pub fn validate_legs(legs: &[Leg]) -> Result<(), Error> {
    if legs.is_empty() {
        return Err(Error::InvalidInput("a transaction needs at least one leg".into()));
    }
    if legs.len() > LEGS_MAX {
        return Err(Error::InvalidInput(format!(
            "a transaction has at most {LEGS_MAX} legs; this one has {}",
            legs.len()
        )));
    }
    let mut seen = BTreeSet::new();
    for leg in legs {
        if leg.amount == 0 {
            return Err(Error::InvalidInput(format!("the leg on account {} has amount zero", leg.account)));
        }
        if leg.amount == i64::MIN {
            return Err(Error::InvalidInput(format!("the leg on account {} has an amount out of range", leg.account)));
        }
        if !seen.insert(leg.account) {
            return Err(Error::InvalidInput(format!("account {} appears in more than one leg", leg.account)));
        }
    }
    Ok(())
}

/// Checks that the legs move money without making any: their sum is zero
/// (computed without overflow).
pub fn validate_balanced(legs: &[Leg]) -> Result<(), Error> {
    let sum: i128 = legs.iter().map(|leg| leg.amount as i128).sum();
    if sum != 0 {
        return Err(Error::InvalidInput(format!("the legs must sum to zero; they sum to {sum}")));
    }
    Ok(())
}

/// An exact sum of amounts: a total of balances that is reported, never
/// wrapped. Each term is an `i64`, so an `i128` holds the sum of fewer than
/// 2^64 of them exactly (at most 2^64 * 2^63 in magnitude). The sum is
/// narrowed only where it must fit an int64 field, and one that does not fit
/// is an error naming it ([`Total::to_amount`]), not a wrong number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Total(i128);

impl Total {
    pub fn add(&mut self, amount: Amount) {
        self.0 += amount as i128;
    }

    pub fn exact(self) -> i128 {
        self.0
    }

    /// The total as an `i64`, or OUT_OF_RANGE naming `what` and the exact
    /// figure.
    pub fn to_amount(self, what: impl fmt::Display) -> Result<Amount, Error> {
        Amount::try_from(self.0).map_err(|_| {
            Error::OutOfRange(format!(
                "{what} is {}, beyond what an int64 carries ({}..={}); read the accounts one by one",
                self.0,
                Amount::MIN,
                Amount::MAX
            ))
        })
    }
}

impl std::iter::Sum<Amount> for Total {
    fn sum<I: Iterator<Item = Amount>>(amounts: I) -> Total {
        let mut total = Total::default();
        amounts.for_each(|amount| total.add(amount));
        total
    }
}

/// The two legs of a transfer, after its own checks.
pub fn transfer_legs(from: AccountId, to: AccountId, amount: Amount) -> Result<[Leg; 2], Error> {
    if amount <= 0 {
        return Err(Error::InvalidInput(format!("the amount must be positive; it is {amount}")));
    }
    if from == to {
        return Err(Error::InvalidInput(format!("the source and the target are the same account ({from})")));
    }
    Ok([Leg { account: from, amount: -amount }, Leg { account: to, amount }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet_and_reject_the_rest() {
        assert!(Id::parse("id", "c1-000001-0000000042").is_ok());
        assert!(Id::parse("id", "a.b_c:d").is_ok());
        assert!(matches!(Id::parse("id", ""), Err(Error::InvalidInput(_))));
        assert!(matches!(Id::parse("id", "has space"), Err(Error::InvalidInput(_))));
        assert!(matches!(Id::parse("id", "é"), Err(Error::InvalidInput(_))));
        assert!(Id::parse("id", &"x".repeat(ID_LEN_MAX)).is_ok());
        assert!(matches!(Id::parse("id", &"x".repeat(ID_LEN_MAX + 1)), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn event_ids_and_texts_are_bounded() {
        assert!(check_event_id("s1:debited").is_ok());
        assert!(check_event_id(&"x".repeat(EVENT_ID_LEN_MAX)).is_ok());
        assert!(check_event_id(&"x".repeat(EVENT_ID_LEN_MAX + 1)).is_err());
        assert!(check_event_id("").is_err());
        assert!(check_event_id("a/b").is_err());
        assert!(check_text_len("reason", &"x".repeat(REASON_LEN_MAX), REASON_LEN_MAX).is_ok());
        assert!(check_text_len("reason", &"x".repeat(REASON_LEN_MAX + 1), REASON_LEN_MAX).is_err());
        assert_eq!(clip_text("short", 10), "short");
        let clipped = clip_text(&"é".repeat(100), 51);
        assert!(clipped.len() <= 51 && clipped.ends_with("[cut]"), "{clipped}");
    }

    #[test]
    fn legs_are_checked_for_shape_and_balance() {
        let ok = [Leg { account: 1, amount: -5 }, Leg { account: 2, amount: 5 }];
        assert!(validate_legs(&ok).is_ok());
        assert!(validate_balanced(&ok).is_ok());
        assert!(validate_legs(&[]).is_err());
        assert!(validate_legs(&[Leg { account: 1, amount: 0 }]).is_err());
        assert!(validate_legs(&[Leg { account: 1, amount: i64::MIN }]).is_err());
        assert!(validate_legs(&[Leg { account: 1, amount: 1 }, Leg { account: 1, amount: -1 }]).is_err());
        let many: Vec<Leg> = (0..=LEGS_MAX as u64).map(|a| Leg { account: a, amount: 1 }).collect();
        assert!(validate_legs(&many).is_err());
        assert!(
            validate_balanced(&[Leg { account: 1, amount: i64::MAX }, Leg { account: 2, amount: i64::MAX }]).is_err()
        );
        assert!(validate_balanced(&[Leg { account: 1, amount: -5 }, Leg { account: 2, amount: 4 }]).is_err());
    }

    #[test]
    fn totals_are_exact_and_refuse_to_narrow_when_they_do_not_fit() {
        let two_near_max: Total = [i64::MAX - 1, i64::MAX - 1].into_iter().sum();
        assert_eq!(two_near_max.exact(), 2 * (i64::MAX as i128 - 1));
        match two_near_max.to_amount("p1's total_posted") {
            Err(Error::OutOfRange(message)) => {
                assert!(message.contains("p1's total_posted"), "{message}");
                assert!(message.contains("18446744073709551612"), "the exact figure: {message}");
            }
            other => panic!("a total beyond i64 must be OUT_OF_RANGE, not {other:?}"),
        }
        // Exactly at the edges it fits; one past, it does not.
        let at_max: Total = [i64::MAX - 5, 5].into_iter().sum();
        assert_eq!(at_max.to_amount("t"), Ok(i64::MAX));
        let mut past_max = at_max;
        past_max.add(1);
        assert!(matches!(past_max.to_amount("t"), Err(Error::OutOfRange(_))));
        let at_min: Total = [i64::MIN + 1, -1].into_iter().sum();
        assert_eq!(at_min.to_amount("t"), Ok(i64::MIN));
        let below_min: Total = [i64::MIN, -1].into_iter().sum();
        assert!(matches!(below_min.to_amount("t"), Err(Error::OutOfRange(_))));
        // Terms that cancel out after passing the edge still give the exact sum.
        let back: Total = [i64::MAX, i64::MAX, -i64::MAX].into_iter().sum();
        assert_eq!(back.to_amount("t"), Ok(i64::MAX));
        assert_eq!(Total::default().to_amount("t"), Ok(0));
    }

    #[test]
    fn transfers_reject_non_positive_amounts_and_self_transfers() {
        assert!(transfer_legs(1, 2, 10).is_ok());
        assert!(transfer_legs(1, 2, 0).is_err());
        assert!(transfer_legs(1, 2, -3).is_err());
        assert!(transfer_legs(1, 1, 3).is_err());
    }
}
