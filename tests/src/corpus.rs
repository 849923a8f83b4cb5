//! A deterministic, deliberately nasty text corpus for tokenizer parity: Chinese, English,
//! mixed, digits, full-width and CJK punctuation, emoji, accents, URLs, whitespace-only, empty,
//! control and zero-width characters, texts longer than any context, and random code points.

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};

const FIXED: &[&str] = &[
    "",
    " ",
    "\t \n\r\u{3000}\u{a0}",
    "皮卡丘",
    "一只可爱的小猫在草地上玩耍。",
    "左上角有一个红色的大圆形",
    "A photo of a dog playing frisbee on the beach.",
    "Hello, World! It's 2024 — isn’t it?",
    "iPhone 15 Pro Max 256GB 深空黑色",
    "价格：￥1,299.00（包邮）！！",
    "ＡＢＣ１２３ｘｙｚ，全角字符。",
    "「引号」『书名号』《三体》〈短〉【方括号】",
    "“弯引号”和‘单引号’以及\"直引号\"",
    "emoji 🐱🐶🍎 😂👍🏽 👨‍👩‍👧 ❤️",
    "Café naïve résumé Ångström Ñandú São Paulo",
    "ΟΔΟΣ ΣΟΦΙΑ σοφία Straße İstanbul",
    "https://www.example.com/path?q=猫&lang=zh-CN#frag",
    "user@example.com 打电话 +86-10-1234-5678",
    "한국어 텍스트 日本語のテキスト カタカナ ひらがな",
    "𠀀𠀁𪜀 ⺀⻀ 々〆〇 ㄅㄆㄇ",
    "tab\tseparated\tvalues\u{0}nul\u{fffd}replacement",
    "zero\u{200b}width\u{200d}joiner\u{feff}bom\u{00ad}soft",
    "control\u{1}\u{7}\u{1b}[31mred\u{1b}[0m\u{85}nel\u{2028}ls\u{2029}ps",
    "combining e\u{301} a\u{300} o\u{308} ǅ ǈ ﬁ ﬂ Ⅻ ①②③ ㈱",
    "unaffable unbelievable antidisestablishmentarianism",
    "数字 0123456789 3.1415926 1e-10 ５０％ 第100名",
    "mixed中English混合text测试123abc",
    "...!!!???,,,;;;:::---___+++===",
    "¿¡«»‹›„“”‚‘’§¶†‡•…‰′″‴※",
];

/// Builds the corpus: fixed edge cases, then random texts drawn from mixed pools.
pub fn texts(lines: usize, seed: u64) -> Vec<String> {
    let pools: &[&[&str]] = &[
        &[
            "猫",
            "狗",
            "红色",
            "的",
            "一只",
            "在",
            "草地",
            "上",
            "天空",
            "蓝色",
            "汽车",
            "飞机",
            "大",
            "小",
            "圆形",
            "方形",
            "左上角",
            "有",
            "两个",
            "美丽",
        ],
        &[
            "cat", "Dog", "RED", "car", "the", "a", "photo", "of", "running", "blue", "sky", "iPhone", "NBA",
            "COVID-19", "e-mail", "don't",
        ],
        &[
            "，", "。", "！", "？", "、", "；", "：", "（", "）", "《", "》", "…", "——", ",", ".", "!", "?", "(", ")",
            "'", "\"", "#", "@", "/", "\\",
        ],
        &["0", "7", "42", "2024", "3.14", "１", "２３", "½", "²", "٣", "१"],
        &["😀", "🐼", "🇨🇳", "👩🏻‍💻", "✨", "☃", "♥", "✓", "★", "→", "∞", "€", "£", "¥"],
        &["é", "ü", "ñ", "ç", "Å", "ø", "ß", "Œ", "ı", "İ", "Σ", "ς", "Ж", "щ", "ש", "ع", "ก", "ḁ"],
        &[" ", "  ", "\t", "\u{3000}", "\u{a0}", "\u{2009}", "\n", "\r\n", "\u{200b}", "\u{1}", "\u{7f}"],
        &["http://a.cn/x?y=1", "www.baidu.com", "#话题#", "@用户", "~", "^_^", "(╯°□°）╯"],
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut texts: Vec<String> = FIXED.iter().map(|s| s.to_string()).collect();
    // Longer than any context: truncation must keep [SEP] last.
    texts.push("很长的句子".repeat(40));
    texts.push("word ".repeat(80));
    texts.push("x".repeat(250));
    while texts.len() < lines {
        let n = rng.random_range(0..40);
        let mut text = String::new();
        for _ in 0..n {
            let pool = pools.choose(&mut rng).unwrap();
            text.push_str(pool.choose(&mut rng).unwrap());
            if rng.random_bool(0.2) {
                text.push(' ');
            }
        }
        // Now and then a random code point from anywhere in the BMP or the CJK extensions.
        if rng.random_bool(0.3) {
            let c = loop {
                let cp = if rng.random_bool(0.8) {
                    rng.random_range(0x20..0x10000)
                } else {
                    rng.random_range(0x20000..0x2b820)
                };
                if let Some(c) = char::from_u32(cp) {
                    break c;
                }
            };
            text.insert(
                text.char_indices()
                    .map(|(i, _)| i)
                    .nth(rng.random_range(0..=text.chars().count()))
                    .unwrap_or(text.len()),
                c,
            );
        }
        texts.push(text);
    }
    texts
}
