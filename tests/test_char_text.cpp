// The character-level text dataset: vocabulary and split as nanoGPT's shakespeare_char
// prepare.py makes them, encode/decode, batches as get_batch draws them (shifted targets,
// offsets in range, reproducible from the seed), every error, and the real tinyshakespeare.
#include <doctest/doctest.h>
#include <unistd.h>

#include <trident/io/char_text.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <string>
#include <vector>

using namespace trident;
namespace fs = std::filesystem;
using split = io::char_text::split;

namespace {

/// A fresh file path under the system's temporary directory, removed at the end of the scope.
struct temp_file {
  fs::path path;
  explicit temp_file(const std::string& bytes) {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() / ("trident_char_text_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + ".txt");
    std::ofstream f(path, std::ios::binary);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(f.good());
  }
  ~temp_file() {
    std::error_code ec;
    fs::remove(path, ec);
  }
};

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

/// The message of the exception of type E that f throws (a test failure when it throws none).
template <class E = error, class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  FAIL("no exception of the expected type was thrown");
  return {};
}

/// tinyshakespeare: $TRIDENT_TINYSHAKESPEARE when set, else the path CMake was configured with.
std::optional<fs::path> tinyshakespeare() {
  if (const char* v = std::getenv("TRIDENT_TINYSHAKESPEARE"); v && *v) return fs::path(v);
#ifdef TRIDENT_TINYSHAKESPEARE_PATH
  return fs::path(TRIDENT_TINYSHAKESPEARE_PATH);
#else
  return std::nullopt;
#endif
}

// "é" is U+00E9 (2 bytes), "—" U+2014 (3 bytes), "😀" U+1F600 (4 bytes).
const std::string sample = "hello world\nth\xC3\xA9 caf\xC3\xA9 \xE2\x80\x94 ok \xF0\x9F\x98\x80 done\n";

}  // namespace

TEST_CASE("char_text: vocabulary is the sorted distinct code points, tokens index it") {
  temp_file f(sample);
  const io::char_text t(f.path);
  CHECK(t.name() == f.path.string());
  // sorted(set(sample)) in Python.
  const std::vector<char32_t> expect = {U'\n', U' ', U'a', U'c', U'd', U'e', U'f', U'h', U'k', U'l', U'n', U'o',
                                        U'r', U't', U'w', U'\u00E9', U'\u2014', U'\U0001F600'};
  REQUIRE(t.vocab_size() == static_cast<index_t>(expect.size()));
  CHECK(std::equal(t.vocab().begin(), t.vocab().end(), expect.begin()));
  // n counts code points, not bytes: 33 characters in 40 bytes.
  CHECK(t.size() == 33);
  CHECK(t.tokens().size() == 33);
  CHECK(t.tokens()[0] == 7);    // 'h'
  CHECK(t.tokens()[14] == 15);  // 'é'
  CHECK(t.id_of(U'\u2014') == 16);
  CHECK(t.id_of(U'\U0001F600') == 17);
  CHECK(t.id_of(U'z') == -1);
  CHECK(t.id_of(U'\u00E8') == -1);
  CHECK(t.decode(t.tokens()) == sample);
}

TEST_CASE("char_text: encode and decode round trip") {
  const auto t = io::char_text::from_string(sample, "sample");
  CHECK(t.name() == "sample");
  for (const std::string& s : {std::string("hello"), std::string("caf\xC3\xA9 \xE2\x80\x94 \xF0\x9F\x98\x80"), std::string(), sample}) {
    const auto ids = t.encode(s);
    CHECK(t.decode(ids) == s);
  }
  const auto ids = t.encode("\xC3\xA9h");
  REQUIRE(ids.size() == 2);
  CHECK(ids[0] == 15);
  CHECK(ids[1] == 7);
  // Every id decodes to its own character, and back.
  for (std::int32_t i = 0; i < t.vocab_size(); ++i) {
    const std::int32_t one[] = {i};
    CHECK(t.encode(t.decode(one)) == std::vector<std::int32_t>{i});
  }
}

TEST_CASE("char_text: the split is int(n * fraction)") {
  for (int n : {1, 2, 9, 10, 11, 19, 100, 1001, 12345}) {
    std::string s;
    for (int i = 0; i < n; ++i) s += static_cast<char>('a' + i % 26);
    const auto t = io::char_text::from_string(s);
    CHECK(t.size() == n);
    CHECK(t.train_size() == static_cast<index_t>(n * 0.9));
    CHECK(t.train_size() + t.val_size() == n);
    CHECK(t.train_tokens().size() == static_cast<std::size_t>(t.train_size()));
    CHECK(t.val_tokens().size() == static_cast<std::size_t>(t.val_size()));
    CHECK(t.train_tokens().data() == t.tokens().data());
    CHECK(t.val_tokens().data() == t.tokens().data() + t.train_size());
    CHECK(t.size(split::train) == t.train_size());
    CHECK(t.size(split::val) == t.val_size());
  }
  const auto h = io::char_text::from_string("abcdefghij", "ten", 0.5);
  CHECK(h.train_fraction() == 0.5);
  CHECK(h.train_size() == 5);
  CHECK(h.val_size() == 5);
  // 0.7 * 10 = 7.000000000000001 in double, truncated to 7; 0.3 * 10 = 3.0000000000000004 -> 3.
  CHECK(io::char_text::from_string("abcdefghij", "ten", 0.7).train_size() == 7);
  CHECK(io::char_text::from_string("abcdefghij", "ten", 0.3).train_size() == 3);
  for (double bad : {0.0, 1.0, -0.1, 1.5}) {
    const auto m = error_of([&] { (void)io::char_text::from_string("abc", "x", bad); });
    CHECK(contains(m, "train_fraction"));
  }
}

TEST_CASE("char_text: a batch is windows of the split with targets shifted by one") {
  std::string s;
  for (int i = 0; i < 3000; ++i) s += static_cast<char>(' ' + (i * 7 + i / 13) % 90);
  const auto t = io::char_text::from_string(s, "synthetic");
  const index_t B = 7, T = 16;
  for (split sp : {split::train, split::val}) {
    const auto data = t.tokens(sp);
    io::batch_rng rng(42);
    std::vector<std::int32_t> x(B * T), y(B * T);
    std::vector<index_t> off(B);
    for (int rep = 0; rep < 20; ++rep) {
      t.batch(sp, B, T, rng, x.data(), y.data(), off.data());
      for (index_t b = 0; b < B; ++b) {
        const index_t o = off[static_cast<std::size_t>(b)];
        REQUIRE(o >= 0);
        REQUIRE(o + T + 1 <= static_cast<index_t>(data.size()));
        for (index_t k = 0; k < T; ++k) {
          CHECK(x[static_cast<std::size_t>(b * T + k)] == data[static_cast<std::size_t>(o + k)]);
          CHECK(y[static_cast<std::size_t>(b * T + k)] == data[static_cast<std::size_t>(o + k + 1)]);
          if (k + 1 < T) CHECK(y[static_cast<std::size_t>(b * T + k)] == x[static_cast<std::size_t>(b * T + k + 1)]);
        }
      }
    }
    // batch_offsets draws the same offsets as batch from the same stream position.
    io::batch_rng r1(5), r2(5);
    const auto o1 = t.batch_offsets(sp, B, T, r1);
    t.batch(sp, B, T, r2, x.data(), y.data(), off.data());
    CHECK(o1 == off);
    CHECK(r1.position() == r2.position());
    // The span overload gives the same batch.
    std::vector<std::int32_t> x2(B * T), y2(B * T);
    io::batch_rng r3(5);
    t.batch(sp, B, T, r3, std::span<std::int32_t>(x2), std::span<std::int32_t>(y2));
    CHECK(x2 == x);
    CHECK(y2 == y);
  }
}

TEST_CASE("char_text: batches are reproducible from the seed") {
  std::string s;
  for (int i = 0; i < 5000; ++i) s += static_cast<char>('a' + (i * 31 + i / 7) % 26);
  const auto t = io::char_text::from_string(s);
  const index_t B = 12, T = 64;
  auto draw = [&](std::uint64_t seed, int batches) {
    io::batch_rng rng(seed);
    std::vector<std::int32_t> all, x(B * T), y(B * T);
    for (int i = 0; i < batches; ++i) {
      t.batch(split::train, B, T, rng, x.data(), y.data());
      all.insert(all.end(), x.begin(), x.end());
      all.insert(all.end(), y.begin(), y.end());
    }
    return all;
  };
  CHECK(draw(1337, 3) == draw(1337, 3));
  CHECK(draw(1337, 3) != draw(1338, 3));
  // Successive batches of one stream differ.
  io::batch_rng rng(7);
  CHECK(t.batch_offsets(split::train, B, T, rng) != t.batch_offsets(split::train, B, T, rng));
  // The state is (seed, position): restoring the position replays the stream.
  io::batch_rng a(9);
  (void)t.batch_offsets(split::train, B, T, a);
  const auto pos = a.position();
  const auto next = t.batch_offsets(split::train, B, T, a);
  io::batch_rng b(9);
  b.set_position(pos);
  CHECK(t.batch_offsets(split::train, B, T, b) == next);
}

TEST_CASE("char_text: the ranks' shares of a global batch are the global batch, for any number of ranks") {
  std::string s;
  for (int i = 0; i < 3000; ++i) s += static_cast<char>('a' + (i * 17 + i / 5) % 26);
  const auto t = io::char_text::from_string(s);
  const index_t G = 12, T = 16;
  // The single-process global batches, three in a row.
  io::batch_rng ref_rng(42);
  std::vector<std::int32_t> gx(3 * G * T), gy(gx.size());
  for (int k = 0; k < 3; ++k) t.batch(split::train, G, T, ref_rng, gx.data() + k * G * T, gy.data() + k * G * T);
  for (int world : {1, 2, 3, 4}) {
    std::vector<std::int32_t> cx(gx.size()), cy(gy.size());
    for (int rank = 0; rank < world; ++rank) {
      io::batch_rng rng(42);  // every rank seeds alike
      const index_t b = G / world;
      std::vector<std::int32_t> x(b * T), y(b * T);
      for (int k = 0; k < 3; ++k) {
        t.shard_batch(split::train, G, T, rng, rank, world, x.data(), y.data());
        std::copy(x.begin(), x.end(), cx.begin() + k * G * T + rank * b * T);
        std::copy(y.begin(), y.end(), cy.begin() + k * G * T + rank * b * T);
      }
      CHECK(rng.position() == ref_rng.position());  // the same stream position on every rank
    }
    INFO("world " << world);
    CHECK(cx == gx);
    CHECK(cy == gy);
  }
  io::batch_rng rng(1);
  std::vector<std::int32_t> x(G * T), y(G * T);
  CHECK_THROWS_WITH_AS(t.shard_batch(split::train, G, T, rng, 0, 5, x.data(), y.data()),
                       doctest::Contains("not a multiple of world_size 5"), error);
  CHECK_THROWS_WITH_AS(t.shard_batch(split::train, G, T, rng, 4, 4, x.data(), y.data()), doctest::Contains("rank 4"), error);
  CHECK_THROWS_AS(t.shard_batch(split::train, G, T, rng, 0, 0, x.data(), y.data()), error);
}

TEST_CASE("char_text: offsets cover [0, len - block - 1] and never go past it") {
  // val split of 40 tokens, block 8: offsets in 0..31 (32 values).
  std::string s(400, 'x');
  for (std::size_t i = 0; i < s.size(); i += 3) s[i] = 'y';
  const auto t = io::char_text::from_string(s);
  REQUIRE(t.val_size() == 40);
  const index_t T = 8;
  io::batch_rng rng(2024);
  std::vector<int> count(32, 0);
  for (int i = 0; i < 200; ++i) {
    for (index_t o : t.batch_offsets(split::val, 16, T, rng)) {
      REQUIRE(o >= 0);
      REQUIRE(o <= t.val_size() - T - 1);
      ++count[static_cast<std::size_t>(o)];
    }
  }
  // 3200 draws over 32 values: each about 100 times; every one (the ends included) is seen.
  for (int c : count) {
    CHECK(c > 50);
    CHECK(c < 160);
  }
  // The tightest split: len == block + 1 leaves only offset 0.
  io::batch_rng r2(1);
  for (index_t o : t.batch_offsets(split::val, 10, 39, r2)) CHECK(o == 0);
  // batch_rng::below is uniform on a range that does not divide 2^64.
  io::batch_rng r3(3);
  std::vector<int> c3(3, 0);
  for (int i = 0; i < 3000; ++i) ++c3[static_cast<std::size_t>(r3.below(3))];
  for (int c : c3) CHECK(c > 850);
}

TEST_CASE("char_text: errors name the file and the problem") {
  SUBCASE("missing file") {
    const fs::path p = fs::temp_directory_path() / "trident_char_text_no_such_file.txt";
    const auto m = error_of<io::io_error>([&] { io::char_text t(p); });
    CHECK(contains(m, p.string()));
    CHECK(contains(m, "No such file or directory"));
  }
  SUBCASE("a directory") {
    const auto m = error_of<io::io_error>([&] { io::char_text t(fs::temp_directory_path()); });
    CHECK(contains(m, "Is a directory"));
  }
  SUBCASE("empty file") {
    temp_file f("");
    const auto m = error_of<io::io_error>([&] { io::char_text t(f.path); });
    CHECK(contains(m, f.path.string()));
    CHECK(contains(m, "empty"));
    CHECK(contains(error_of<io::io_error>([] { (void)io::char_text::from_string("", "nothing"); }), "nothing"));
  }
  SUBCASE("invalid UTF-8") {
    struct bad_case {
      std::string bytes;
      std::size_t offset;
      const char* why;
    };
    const bad_case cases[] = {
        {"abc\xFF" "def", 3, "can never appear"},
        {"ab\x80", 2, "continuation byte 0x80 without a lead byte"},
        {"abcd\xC3", 4, "ends inside a 2-byte sequence"},
        {"a\xE2\x80z", 1, "not a continuation byte"},
        {"ab\xC0\xAF", 2, "can never appear"},         // C0/C1 only ever start overlong forms
        {"ab\xE0\x80\xAF", 2, "overlong"},
        {"\xED\xA0\x80", 0, "surrogate U+D800"},
        {"xy\xF4\x90\x80\x80", 2, "above U+10FFFF"},
        {"caf\xC3\xA9\xE9", 5, "ends inside a 3-byte"},  // Latin-1 é after a valid UTF-8 one
    };
    for (const auto& c : cases) {
      temp_file f(c.bytes);
      const auto m = error_of<io::io_error>([&] { io::char_text t(f.path); });
      INFO(m);
      CHECK(contains(m, f.path.string()));
      CHECK(contains(m, "byte offset " + std::to_string(c.offset) + ":"));
      CHECK(contains(m, c.why));
    }
  }
  const auto t = io::char_text::from_string("hello, world\n" + std::string(100, 'a'), "small");
  SUBCASE("unknown character in encode") {
    const auto m = error_of([&] { (void)t.encode("hello z"); });
    CHECK(contains(m, "'z' (U+007A)"));
    CHECK(contains(m, "position 6"));
    CHECK(contains(m, "small"));
    CHECK(contains(error_of([&] { (void)t.encode("h\xC3\xA9"); }), "'\xC3\xA9' (U+00E9)"));
    CHECK(contains(error_of([&] { (void)t.encode("a\td"); }), "character U+0009 at position 1"));
    CHECK(contains(error_of([&] { (void)t.encode("a\xFF"); }), "byte offset 1"));
  }
  SUBCASE("bad id in decode") {
    const std::int32_t ids[] = {0, 1, static_cast<std::int32_t>(t.vocab_size())};
    const auto m = error_of([&] { (void)t.decode(ids); });
    CHECK(contains(m, "token " + std::to_string(t.vocab_size()) + " at position 2"));
    const std::int32_t neg[] = {-1};
    CHECK(contains(error_of([&] { (void)t.decode(neg); }), "token -1 at position 0"));
  }
  SUBCASE("block too long for the split") {
    REQUIRE(t.val_size() == 12);  // 113 characters: train int(101.7) = 101
    io::batch_rng rng(1);
    std::vector<std::int32_t> x(64), y(64);
    const auto m = error_of([&] { t.batch(split::val, 1, 12, rng, x.data(), y.data()); });
    CHECK(contains(m, "val split"));
    CHECK(contains(m, "holds 12 tokens"));
    CHECK(contains(m, "block of 12"));
    CHECK_NOTHROW(t.batch(split::val, 1, 11, rng, x.data(), y.data()));
    CHECK(contains(error_of([&] { (void)t.batch_offsets(split::train, 1, 101, rng); }), "train split"));
  }
  SUBCASE("batch and block must be positive, spans the right size") {
    io::batch_rng rng(1);
    std::vector<std::int32_t> x(64), y(64);
    CHECK(contains(error_of([&] { t.batch(split::train, 0, 8, rng, x.data(), y.data()); }), "batch size 0"));
    CHECK(contains(error_of([&] { t.batch(split::train, 2, -1, rng, x.data(), y.data()); }), "block size -1"));
    CHECK(contains(error_of([&] { (void)t.batch_offsets(split::train, -3, 8, rng); }), "batch size -3"));
    CHECK(contains(error_of([&] { t.batch(split::train, 4, 8, rng, std::span<std::int32_t>(x), std::span<std::int32_t>(y)); }),
                   "needs 32 each"));
  }
}

TEST_CASE("char_text: tinyshakespeare as nanoGPT's shakespeare_char prepares it") {
  const auto path = tinyshakespeare();
  std::error_code ec;
  if (!path || !fs::exists(*path, ec)) {
    MESSAGE("skipped: tinyshakespeare not found (set TRIDENT_TINYSHAKESPEARE or configure with -DTRIDENT_TINYSHAKESPEARE=<file>)"
            << (path ? "; looked at " + path->string() : std::string()));
    return;
  }
  const io::char_text t(*path);
  // prepare.py: "length of dataset in characters: 1,115,394", "vocab size: 65",
  // "train has 1,003,854 tokens", "val has 111,540 tokens".
  CHECK(t.size() == 1115394);
  CHECK(t.vocab_size() == 65);
  CHECK(t.train_size() == 1003854);
  CHECK(t.val_size() == 111540);
  CHECK(t.decode(t.train_tokens().first(13)) == "First Citizen");
  // The vocabulary: "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".
  std::string chars;
  for (char32_t c : t.vocab()) chars += static_cast<char>(c);
  CHECK(chars == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz");
  CHECK(t.encode("hii there") == std::vector<std::int32_t>{46, 47, 47, 1, 58, 46, 43, 56, 43});  // nanoGPT's own example
  io::batch_rng rng(1337);
  std::vector<std::int32_t> x(12 * 64), y(12 * 64);
  t.batch(split::val, 12, 64, rng, x.data(), y.data());
  CHECK(std::equal(x.begin() + 1, x.begin() + 64, y.begin()));
}
