//! A value remembered per key for a while: what the operator asks of the outside world once for every
//! policy that wants it (a collector's canary, the flows receivers' reports).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Memo<K, V> {
    last: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self { last: Mutex::default() }
    }
}

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    /// The value remembered for `key`, if it is younger than `fresh_for`.
    pub fn fresh(&self, key: &K, fresh_for: Duration) -> Option<V> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.get(key).filter(|(at, _)| at.elapsed() < fresh_for).map(|(_, v)| v.clone())
    }

    /// Remembers `value` for `key`, from now.
    pub fn put(&self, key: K, value: V) {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (Instant::now(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_remembered_while_it_is_fresh() {
        let memo = Memo::default();
        assert_eq!(memo.fresh(&"a", Duration::from_secs(60)), None);
        memo.put("a", 1);
        assert_eq!(memo.fresh(&"a", Duration::from_secs(60)), Some(1));
        assert_eq!(memo.fresh(&"a", Duration::ZERO), None);
        assert_eq!(memo.fresh(&"b", Duration::from_secs(60)), None);
    }
}
