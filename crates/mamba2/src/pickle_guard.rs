//! A bounded pre-scan of a PyTorch checkpoint's pickle before Candle's reader sees it.
//!
//! Candle's reader trusts two things a hostile file controls: declared string lengths (it
//! allocates them before reading) and memo references (it deep-copies the stored object on each
//! reference, so a few hundred bytes can describe 2^40 objects). This scan walks the opcodes
//! without building anything, tracking for each stack entry how many objects a deep copy of it
//! would hold, and refuses the file when a length runs past the data or a copy would grow past a
//! bound no real checkpoint comes near. It executes nothing, like Candle's reader.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Largest object (in nested objects, strings counted by length / 16) a checkpoint may build.
const MAX_OBJECT_WEIGHT: u64 = 1 << 26;
/// Largest `data.pkl` read into memory for the scan.
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// Checks every `*data.pkl` of the zip at `path`. `Err` carries a message for the user.
pub(crate) fn check_checkpoint(path: &Path) -> std::result::Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| format!("not a readable zip archive: {e}"))?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = entry
            .name()
            .map_err(|e| format!("zip entry {i}: {e}"))?
            .to_string();
        if !name.ends_with("data.pkl") {
            continue;
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{name}: {e}"))?;
        if bytes.len() as u64 > MAX_PICKLE_BYTES {
            return Err(format!("{name} is larger than {MAX_PICKLE_BYTES} bytes"));
        }
        scan(&bytes).map_err(|e| format!("{name}: refused by the pickle pre-scan: {e}"))?;
    }
    Ok(())
}

/// Walks the opcodes of one pickle. Each stack entry is the weight of the object it stands for.
pub(crate) fn scan(data: &[u8]) -> std::result::Result<(), String> {
    const MARK: u64 = u64::MAX;
    let mut pos = 0usize;
    let mut stack: Vec<u64> = Vec::new();
    let mut memo: HashMap<u64, u64> = HashMap::new();
    let take = |pos: &mut usize, n: u64| -> std::result::Result<&[u8], String> {
        let n = usize::try_from(n).map_err(|_| "length overflows".to_string())?;
        if n > data.len() - *pos {
            return Err(format!(
                "a length of {n} bytes at offset {} runs past the end of the data",
                *pos
            ));
        }
        let s = &data[*pos..*pos + n];
        *pos += n;
        Ok(s)
    };
    let uint = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
    let line = |pos: &mut usize| -> std::result::Result<(), String> {
        match data[*pos..].iter().position(|&c| c == b'\n') {
            Some(i) => {
                *pos += i + 1;
                Ok(())
            }
            None => Err("unterminated line argument".into()),
        }
    };
    let pop = |stack: &mut Vec<u64>| {
        stack
            .pop()
            .filter(|&w| w != MARK)
            .ok_or_else(|| "stack underflow".to_string())
    };
    let pop_mark = |stack: &mut Vec<u64>| -> std::result::Result<u64, String> {
        let mut sum = 0u64;
        loop {
            match stack.pop() {
                Some(MARK) => return Ok(sum),
                Some(w) => sum = sum.saturating_add(w),
                None => return Err("no mark on the stack".into()),
            }
        }
    };
    let push = |stack: &mut Vec<u64>, w: u64| -> std::result::Result<(), String> {
        if w > MAX_OBJECT_WEIGHT {
            return Err(format!(
                "an object would hold more than {MAX_OBJECT_WEIGHT} nested objects"
            ));
        }
        stack.push(w);
        Ok(())
    };
    let add_to_top = |stack: &mut Vec<u64>, w: u64| -> std::result::Result<(), String> {
        let top = pop(stack)?;
        push(stack, top.saturating_add(w))
    };
    while pos < data.len() {
        let op = data[pos];
        pos += 1;
        match op {
            b'.' => return Ok(()),            // STOP
            0x80 => drop(take(&mut pos, 1)?), // PROTO
            0x95 => drop(take(&mut pos, 8)?), // FRAME
            b'(' => stack.push(MARK),         // MARK
            b')' | b']' | b'}' | 0x8f | b'N' | 0x88 | 0x89 => push(&mut stack, 1)?,
            b'J' | b'K' | b'M' | b'G' | 0x82 | 0x83 | 0x84 => {
                let n = match op {
                    b'J' => 4,
                    b'K' => 1,
                    b'M' => 2,
                    b'G' => 8,
                    0x82 => 1,
                    0x83 => 2,
                    _ => 4,
                };
                take(&mut pos, n)?;
                push(&mut stack, 1)?;
            }
            // LONG1/LONG4, strings and bytes: declared length, then the data
            0x8a | 0x8b | b'X' | 0x8c | 0x8d | b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                let width = match op {
                    0x8a | 0x8c | b'U' | b'C' => 1,
                    0x8d | 0x8e | 0x96 => 8,
                    _ => 4,
                };
                let len = uint(take(&mut pos, width)?);
                take(&mut pos, len)?;
                push(&mut stack, 1 + len / 16)?;
            }
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' => {
                line(&mut pos)?;
                push(&mut stack, 1)?;
            }
            b'c' => {
                line(&mut pos)?;
                line(&mut pos)?;
                push(&mut stack, 1)?;
            }
            0x93 => {
                let w = pop(&mut stack)?.saturating_add(pop(&mut stack)?); // STACK_GLOBAL
                push(&mut stack, w)?;
            }
            b'q' | b'r' | 0x94 => {
                let idx = match op {
                    b'q' => uint(take(&mut pos, 1)?),
                    b'r' => uint(take(&mut pos, 4)?),
                    _ => memo.len() as u64,
                };
                let top = *stack
                    .last()
                    .filter(|&&w| w != MARK)
                    .ok_or("memo store on an empty stack")?;
                memo.insert(idx, top);
            }
            b'h' | b'j' => {
                let idx = uint(take(&mut pos, if op == b'h' { 1 } else { 4 })?);
                let w = *memo
                    .get(&idx)
                    .ok_or_else(|| format!("memo entry {idx} is read before it is stored"))?;
                push(&mut stack, w)?;
            }
            b't' | b'l' | b'd' | 0x91 | b'o' => {
                let w = pop_mark(&mut stack)?;
                push(&mut stack, w.saturating_add(1))?;
            }
            b'i' => {
                line(&mut pos)?;
                line(&mut pos)?;
                let w = pop_mark(&mut stack)?;
                push(&mut stack, w.saturating_add(1))?;
            }
            0x85..=0x87 => {
                let mut w = 1u64;
                for _ in 0..(op - 0x84) {
                    w = w.saturating_add(pop(&mut stack)?);
                }
                push(&mut stack, w)?;
            }
            b'a' | b'b' => {
                let v = pop(&mut stack)?;
                add_to_top(&mut stack, v)?;
            }
            b's' => {
                let v = pop(&mut stack)?.saturating_add(pop(&mut stack)?);
                add_to_top(&mut stack, v)?;
            }
            b'e' | b'u' | 0x90 => {
                let v = pop_mark(&mut stack)?;
                add_to_top(&mut stack, v)?;
            }
            b'R' | 0x81 => {
                let w = pop(&mut stack)?
                    .saturating_add(pop(&mut stack)?)
                    .saturating_add(1);
                push(&mut stack, w)?;
            }
            0x92 => {
                let mut w = 1u64;
                for _ in 0..3 {
                    w = w.saturating_add(pop(&mut stack)?);
                }
                push(&mut stack, w)?;
            }
            b'Q' => add_to_top(&mut stack, 1)?,  // BINPERSID
            b'0' => drop(pop(&mut stack)?),      // POP
            b'1' => drop(pop_mark(&mut stack)?), // POP_MARK
            b'2' => {
                let top = *stack
                    .last()
                    .filter(|&&w| w != MARK)
                    .ok_or("DUP on an empty stack")?;
                push(&mut stack, top)?;
            }
            0x97 => push(&mut stack, 1)?, // NEXT_BUFFER
            0x98 => {}                    // READONLY_BUFFER
            other => {
                return Err(format!(
                    "unknown opcode 0x{other:02x} at offset {}",
                    pos - 1
                ))
            }
        }
    }
    Err("no STOP opcode".into())
}

#[cfg(test)]
mod tests {
    use super::scan;

    #[test]
    fn a_plain_dict_of_lists_passes() {
        // PROTO 2, EMPTY_DICT, BINPUT 0, MARK, SHORT_BINUNICODE "a", EMPTY_LIST, BININT1 7,
        // APPEND, SETITEMS, STOP
        let p = [
            0x80, 2, b'}', b'q', 0, b'(', 0x8c, 1, b'a', b']', b'K', 7, b'a', b'u', b'.',
        ];
        assert_eq!(scan(&p), Ok(()));
    }

    #[test]
    fn declared_lengths_past_the_data_are_refused() {
        let p = [0x80, 2, b'X', 0x27, 0, 0, 0xff, b'a', b'.'];
        assert!(scan(&p).unwrap_err().contains("runs past the end"));
        let p = [0x80, 2, 0x8d, 0, 0, 0, 0, 0, 0, 0, 0x80, b'.'];
        assert!(scan(&p).unwrap_err().contains("runs past the end"));
    }

    #[test]
    fn memo_doubling_is_refused() {
        // EMPTY_LIST BINPUT 0, then 40 x (BINGET 0, BINGET 0, TUPLE2, BINPUT 0): each step doubles
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..40 {
            p.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        p.push(b'.');
        assert!(scan(&p).unwrap_err().contains("nested objects"));
        // the same with 20 steps (about a million objects) is fine
        let mut q = vec![0x80, 2, b']', b'q', 0];
        for _ in 0..20 {
            q.extend([b'h', 0, b'h', 0, 0x86, b'q', 0]);
        }
        q.push(b'.');
        assert_eq!(scan(&q), Ok(()));
    }

    #[test]
    fn malformed_streams_are_errors_not_panics() {
        let cases: [&[u8]; 7] = [b"a", &[b'h', 3], b"(", b"cx", &[0xff], b"1", b""];
        for p in cases {
            assert!(scan(p).is_err(), "{p:?}");
        }
    }
}
