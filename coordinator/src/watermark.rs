//! Low watermarks per participant: the bookkeeping that the 2PC core
//! ([`crate::core`]) and the saga core ([`crate::saga`]) share. Which
//! transaction or saga holds which participant is each core's rule (see
//! their essays); this module keeps the sets ordered by position, so that a
//! watermark costs a lookup of the first element, never a scan.
//!
//! # Positions
//!
//! Every transaction and saga gets a position when it is registered
//! ([`Watermarks::register`]): strictly greater than every position this
//! core registered before, so the driver hands them out under the lock that
//! registers them (an id handed out and not yet registered would otherwise
//! be below a watermark already sent).
//!
//! # The candidate and the floor
//!
//! For participant `p`, the candidate is the smallest position among the
//! entries that still hold `p`, or, with none, the next position (one past
//! the last registered). Every position below it is finished as far as `p`
//! is concerned, and stays so: entries are only added at positions at or
//! above the next position.
//!
//! What is sent is not the candidate but the floor: the last candidate made
//! durable in the log (`m/w/<participant>`, see `log.rs`). A restarted
//! coordinator recovers its logged commits with every participant pending
//! again, including those that acknowledged before the crash; the floor
//! says which did (a recovered entry below `p`'s floor had finished with
//! `p`, or the floor could not have passed it), so the watermark a
//! participant hears never goes back, across restarts too. Both are
//! asserted here: a floor only rises, and a candidate is never below it.

use std::collections::{BTreeMap, BTreeSet};
use tandem::domain::Id;
use tandem::Error;

#[derive(Debug, Default, Clone)]
pub struct Watermarks {
    /// Per participant, the (position, id) of every entry that still holds it.
    holding: BTreeMap<Id, BTreeSet<(u64, Id)>>,
    /// One past the highest position registered.
    next_position: u64,
    /// Per participant, the durable watermark: what the driver sends.
    floors: BTreeMap<Id, u64>,
}

impl Watermarks {
    /// Starts at `next_position` (the first position of this process's
    /// generation), with the floors read back from the log.
    pub fn start(&mut self, next_position: u64, floors: BTreeMap<Id, u64>) {
        for (participant, floor) in &floors {
            assert!(
                *floor <= next_position.max(self.next_position),
                "the watermark floor of {participant} ({floor}) is past the next position ({next_position})"
            );
        }
        self.next_position = self.next_position.max(next_position);
        self.floors = floors;
    }

    /// Registers a new position; refused (and nothing changes) unless it is
    /// above every position registered before.
    pub fn register(&mut self, position: u64) -> Result<(), Error> {
        if position < self.next_position {
            return Err(Error::InvalidInput(format!(
                "position {position} is below the next position {}: positions only go up",
                self.next_position
            )));
        }
        self.next_position = position.checked_add(1).ok_or_else(|| Error::Fatal("positions are exhausted".into()))?;
        Ok(())
    }

    /// `id` at `position` holds `participant`'s watermark until released.
    /// A recovered entry below the participant's floor had finished with it
    /// before the restart: it does not hold it (and `false` says so).
    pub fn hold(&mut self, participant: &Id, position: u64, id: &Id) -> bool {
        if position < self.floor(participant) {
            return false;
        }
        self.holding.entry(participant.clone()).or_default().insert((position, id.clone()));
        true
    }

    /// `id` no longer holds `participant`'s watermark (nothing if it did not).
    pub fn release(&mut self, participant: &Id, position: u64, id: &Id) {
        if let Some(set) = self.holding.get_mut(participant) {
            set.remove(&(position, id.clone()));
        }
    }

    /// The durable watermark of `participant`: what is sent (0: none yet).
    pub fn floor(&self, participant: &Id) -> u64 {
        self.floors.get(participant).copied().unwrap_or(0)
    }

    /// What the watermark of `participant` may rise to now.
    pub fn candidate(&self, participant: &Id) -> u64 {
        let first_held = self.holding.get(participant).and_then(|set| set.first()).map(|(position, _)| *position);
        let candidate = first_held.unwrap_or(self.next_position).min(self.next_position);
        let floor = self.floor(participant);
        assert!(candidate >= floor, "the watermark of {participant} would go back from {floor} to {candidate}");
        candidate
    }

    /// The participants whose candidate is above their floor, with it.
    pub fn due(&self) -> Vec<(Id, u64)> {
        self.holding
            .keys()
            .chain(self.floors.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|participant| {
                let candidate = self.candidate(participant);
                (candidate > self.floor(participant)).then(|| (participant.clone(), candidate))
            })
            .collect()
    }

    /// These watermarks are durable in the log: they are what is sent now.
    /// Each must be at least the floor it replaces and at most the
    /// candidate (which never went back since [`Watermarks::due`] said it).
    pub fn on_durable(&mut self, advanced: &[(Id, u64)]) {
        for (participant, watermark) in advanced {
            let floor = self.floor(participant);
            assert!(*watermark >= floor, "the watermark of {participant} would go back from {floor} to {watermark}");
            assert!(
                *watermark <= self.candidate(participant),
                "the watermark of {participant} would pass an entry that holds it"
            );
            self.floors.insert(participant.clone(), *watermark);
            self.holding.entry(participant.clone()).or_default();
        }
    }

    /// How many entries hold `participant`.
    pub fn held_count(&self, participant: &Id) -> usize {
        self.holding.get(participant).map_or(0, BTreeSet::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Id {
        Id::parse("id", text).unwrap()
    }

    #[test]
    fn the_watermark_is_the_first_held_position_or_the_next_one_and_never_goes_back() {
        let mut marks = Watermarks::default();
        marks.start(10, BTreeMap::new());
        let p = id("p1");
        assert!(marks.register(9).is_err(), "below the next position");
        marks.register(10).unwrap();
        marks.hold(&p, 10, &id("t10"));
        marks.register(12).unwrap();
        marks.hold(&p, 12, &id("t12"));
        assert_eq!(marks.candidate(&p), 10);
        assert_eq!(marks.due(), vec![(p.clone(), 10)]);
        marks.on_durable(&marks.due());
        assert_eq!(marks.floor(&p), 10);
        marks.release(&p, 12, &id("t12"));
        assert_eq!(marks.candidate(&p), 10, "held back by t10");
        marks.release(&p, 10, &id("t10"));
        assert_eq!(marks.candidate(&p), 13, "none held: the next position");
        marks.on_durable(&marks.due());
        assert!(marks.due().is_empty());
        // Restarted: an entry below the floor does not hold it.
        let mut again = Watermarks::default();
        again.start(100, [(p.clone(), 13)].into());
        assert!(!again.hold(&p, 12, &id("t12")));
        assert!(again.hold(&p, 13, &id("t13")));
        assert_eq!(again.candidate(&p), 13);
    }

    #[test]
    #[should_panic(expected = "would go back")]
    fn a_watermark_that_would_go_back_is_a_crash() {
        let mut marks = Watermarks::default();
        marks.start(10, [(id("p1"), 5)].into());
        marks.on_durable(&[(id("p1"), 4)]);
    }
}
