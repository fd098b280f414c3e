//! `logits` on a fixture: the .npy rows are log-probabilities, and their top-1 is the argmax of
//! the decoder's own logits for the same ids, run one prompt at a time (no batching, no padding).

use crate::common::{bin, fixture};
use sl_engine::{Logits, Model, PromptRecord, Template};

/// The `[rows, cols]` f32 array of a .npy file (version 1, little-endian, C order).
fn read_npy(bytes: &[u8]) -> (usize, usize, Vec<f32>) {
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00", "npy magic and version");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + len) % 64, 0, "header padded to 64 bytes");
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"));
    let shape = header.split("'shape': (").nth(1).unwrap();
    let dims: Vec<usize> = shape[..shape.find(')').unwrap()]
        .split(',')
        .map(|d| d.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = bytes[10 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        data.len(),
        dims[0] * dims[1],
        "data matches the header's shape"
    );
    (dims[0], dims[1], data)
}

#[test]
fn logits_rows_are_log_probabilities_with_the_decoders_argmax() {
    let d = tempfile::tempdir().unwrap();
    let lines = [
        "Give three tips for staying healthy.",
        "What is the capital of France?",
        "Name a colour.",
    ];
    let p = d.path().join("prompts.txt");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    let out = d.path().join("l.json");
    let run = bin()
        .args(["logits", "--model"])
        .arg(fixture("llama"))
        .arg("--prompts")
        .arg(&p)
        .args(["--greedy", "3", "--batch-size", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["logprobs"], "l.npy");
    let (rows, vocab, data) = read_npy(&std::fs::read(d.path().join("l.npy")).unwrap());
    assert_eq!(rows, 3);
    assert_eq!(v["logprobs_shape"], serde_json::json!([rows, vocab]));

    let m = Model::load(&fixture("llama")).unwrap();
    assert_eq!(vocab, m.cfg().vocab_size);
    let records: Vec<PromptRecord> = lines.iter().map(|l| PromptRecord::new(l)).collect();
    let prompts = m.prompts(&records, Template::Alpaca).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let item = &v["items"][i];
        let ids: Vec<u32> = serde_json::from_value(item["input_ids"].clone()).unwrap();
        assert_eq!(
            ids, prompt.ids,
            "prompt {i}: the ids fed are the template's"
        );
        let row = &data[i * vocab..(i + 1) * vocab];
        let mass: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        assert!(
            (mass - 1.0).abs() < 1e-5,
            "prompt {i}: probabilities sum to {mass}"
        );

        let t =
            candle_core::Tensor::from_vec(ids.clone(), (1, ids.len()), &m.decoder.device).unwrap();
        let logits: Vec<f32> = m
            .decoder
            .logits(&t, &[0], None, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = sl_engine::infer::generate::argmax(&logits);
        let top1 = item["top5"][0][0].as_u64().unwrap() as u32;
        assert_eq!(top1, want, "prompt {i}: top-1 is the decoder's argmax");
        assert_eq!(
            sl_engine::infer::generate::argmax(row),
            want,
            "prompt {i}: npy argmax"
        );
        assert_eq!(item["top5"].as_array().unwrap().len(), 5);
        let greedy = item["greedy"].as_array().unwrap();
        assert_eq!(greedy.len(), 3, "prompt {i}: --greedy 3 gives 3 tokens");
        assert_eq!(
            greedy[0].as_u64().unwrap() as u32,
            want,
            "prompt {i}: greedy starts at top-1"
        );
    }
}

#[test]
fn logits_refuses_a_non_json_output_without_writing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("prompts.txt");
    std::fs::write(&p, "Name a colour.\n").unwrap();
    let out = d.path().join("l.npy");
    let run = bin()
        .args(["logits", "--model"])
        .arg(fixture("llama"))
        .arg("--prompts")
        .arg(&p)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("expected a .json file name"));
    assert_eq!(
        std::fs::read_dir(d.path()).unwrap().count(),
        1,
        "only the prompts file"
    );
}
