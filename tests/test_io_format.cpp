// Tests of the safetensors reader and writer: malformed files, files from an
// independent writer, round trips of every dtype, conversion and atomicity.
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "cki/io/half.hpp"
#include "cki/io/safetensors.hpp"
#include "cki/io/sharded.hpp"
#include "io_test_support.hpp"

using Catch::Matchers::Contains;
using cki::DType;
using namespace cki_test;

namespace {

struct MalformedCase {
  const char* name;
  std::string bytes;
  std::vector<std::string> expected;  // fragments the message must contain
};

std::string f32_entry(const std::string& name, const std::string& shape, const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"F32\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

std::vector<MalformedCase> malformed_corpus() {
  const std::string data8(8, '\x01');
  const std::string valid = "{" + f32_entry("w", "[2]", "[0,8]") + "}";
  std::vector<MalformedCase> cases = {
      {"empty file", "", {"is 0 bytes long", "shorter than the 8-byte header length"}},
      {"shorter than the length field", std::string("\x05\x00\x00", 3), {"is 3 bytes long"}},
      {"header above the limit", safetensors_bytes(valid, data8, 100'000'001),
       {"header of 100000001 bytes", "more than the limit of 100000000"}},
      {"header past the end", safetensors_bytes(valid, data8, 1000),
       {"header of 1000 bytes", "but only", "follow the header length"}},
      {"header too short", safetensors_bytes("{", ""), {"header of 1 bytes, too short for a JSON object"}},
      {"header not UTF-8", safetensors_bytes("{\"w\xff\":1}", ""), {"is not valid UTF-8: byte 3", "value 255"}},
      {"header an array", safetensors_bytes("[1, 2]", ""), {"starts with '['", "must start with '{'"}},
      {"header with leading space", safetensors_bytes(" " + valid, data8), {"starts with ' '"}},
      {"header not JSON", safetensors_bytes("{\"w\": ", ""), {"is not valid JSON"}},
      {"header with text after the object", safetensors_bytes(valid + " x", data8), {"is not valid JSON"}},
      {"duplicate tensor", safetensors_bytes("{" + f32_entry("w", "[2]", "[0,8]") + "," + f32_entry("w", "[2]", "[8,16]") + "}", data8 + data8),
       {"has the key 'w' twice"}},
      {"duplicate metadata key", safetensors_bytes("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}", ""),
       {"has the key 'k' twice"}},
      {"entry not an object", safetensors_bytes("{\"w\":5}", ""), {"tensor 'w'", "number 5, not a JSON object"}},
      {"missing dtype", safetensors_bytes("{\"w\":{\"shape\":[2],\"data_offsets\":[0,8]}}", data8),
       {"tensor 'w'", "has no 'dtype' field"}},
      {"missing data_offsets", safetensors_bytes("{\"w\":{\"dtype\":\"F32\",\"shape\":[2]}}", data8),
       {"has no 'data_offsets' field"}},
      {"unknown field", safetensors_bytes("{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"extra\":1}}", data8),
       {"tensor 'w'", "unknown field 'extra'"}},
      {"unknown dtype", safetensors_bytes("{\"w\":{\"dtype\":\"F7\",\"shape\":[2],\"data_offsets\":[0,8]}}", data8),
       {"tensor 'w'", "unknown dtype \"F7\""}},
      {"dtype not a string", safetensors_bytes("{\"w\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", data8),
       {"has dtype 4, which is not a string"}},
      {"shape not an array", safetensors_bytes("{" + f32_entry("w", "2", "[0,8]") + "}", data8),
       {"has shape 2, which is not an array"}},
      {"negative dimension", safetensors_bytes("{" + f32_entry("w", "[-2]", "[0,8]") + "}", data8),
       {"negative dimension -2"}},
      {"fractional dimension", safetensors_bytes("{" + f32_entry("w", "[1.5]", "[0,8]") + "}", data8),
       {"non-integer dimension 1.5"}},
      {"dimension beyond 64-bit signed", safetensors_bytes("{" + f32_entry("w", "[9223372036854775808]", "[0,8]") + "}", data8),
       {"element count overflows 64 bits"}},
      {"element count overflow", safetensors_bytes("{" + f32_entry("w", "[4294967296,4294967296]", "[0,8]") + "}", data8),
       {"[4294967296,4294967296]", "element count overflows 64 bits"}},
      {"byte size overflow", safetensors_bytes("{" + f32_entry("w", "[4611686018427387904]", "[0,8]") + "}", data8),
       {"byte size overflows 64 bits"}},
      {"offsets of one element", safetensors_bytes("{" + f32_entry("w", "[2]", "[0]") + "}", data8),
       {"data_offsets [0]", "expected two non-negative integers"}},
      {"negative offset", safetensors_bytes("{" + f32_entry("w", "[2]", "[-8,0]") + "}", data8),
       {"data_offsets [-8,0]", "expected two non-negative integers"}},
      {"begin past end", safetensors_bytes("{" + f32_entry("w", "[0]", "[8,0]") + "}", data8),
       {"data_offsets [8,0] whose begin is past its end"}},
      {"byte length mismatch", safetensors_bytes("{" + f32_entry("w", "[3]", "[0,8]") + "}", data8),
       {"shape [3] and dtype F32, which need 12 bytes, but data_offsets [0,8] span 8"}},
      {"first tensor not at zero", safetensors_bytes("{" + f32_entry("w", "[2]", "[4,12]") + "}", data8 + "1234"),
       {"tensor 'w'", "starts at byte 4", "gap after the start of the data section"}},
      {"gap between tensors", safetensors_bytes("{" + f32_entry("a", "[2]", "[0,8]") + "," + f32_entry("b", "[2]", "[12,20]") + "}", data8 + "1234" + data8),
       {"tensor 'b'", "starts at byte 12", "gap after tensor 'a', which ends at byte 8"}},
      {"overlapping tensors", safetensors_bytes("{" + f32_entry("a", "[2]", "[0,8]") + "," + f32_entry("b", "[2]", "[4,12]") + "}", data8 + "1234"),
       {"tensor 'b'", "occupies bytes [4, 12)", "overlapping tensor 'a'"}},
      {"truncated data", safetensors_bytes(valid, data8.substr(0, 5)),
       {"places tensor 'w' up to byte", "the file is truncated"}},
      {"trailing bytes", safetensors_bytes(valid, data8 + "xyz"),
       {"has 3 bytes after the end of its last tensor"}},
      {"metadata not an object", safetensors_bytes("{\"__metadata__\":[1]}", ""),
       {"'__metadata__'", "[1], not a JSON object of strings"}},
      {"metadata value not a string", safetensors_bytes("{\"__metadata__\":{\"k\":1}}", ""),
       {"metadata entry 'k'", "is 1, not a string"}},
  };
  return cases;
}

}  // namespace

TEST_CASE("malformed safetensors files are rejected", "[io][format]") {
  TempDir dir;
  const auto cases = malformed_corpus();
  REQUIRE(cases.size() >= 20);
  int index = 0;
  for (const auto& item : cases) {
    const auto path = dir / ("case" + std::to_string(index++) + ".safetensors");
    write_file(path, item.bytes);
    INFO("case: " << item.name);
    const std::string message = error_message<cki::FormatError>([&] { cki::SafetensorsFile file(path); });
    CHECK_THAT(message, Contains(path.string()));
    for (const auto& fragment : item.expected) CHECK_THAT(message, Contains(fragment));
  }
}

TEST_CASE("valid minimal files are accepted", "[io][format]") {
  TempDir dir;

  SECTION("no tensors") {
    write_file(dir / "empty.safetensors", safetensors_bytes("{}", ""));
    const cki::SafetensorsFile file(dir / "empty.safetensors");
    CHECK(file.tensors().empty());
  }
  SECTION("zero-size tensors share an offset, padding spaces follow the JSON") {
    const std::string header =
        "{" + f32_entry("a", "[0]", "[0,0]") + "," + f32_entry("b", "[1]", "[0,4]") + "," + f32_entry("c", "[0, 3]", "[4,4]") + "}   ";
    write_file(dir / "zero.safetensors", safetensors_bytes(header, "abcd"));
    const cki::SafetensorsFile file(dir / "zero.safetensors");
    REQUIRE(file.tensors().size() == 3);
    CHECK(file.find("c")->numel() == 0);
    CHECK(file.data_start() == 8 + header.size());
  }
  SECTION("every dtype name of the format") {
    std::string header = "{";
    std::string data;
    for (DType dtype : cki::kAllDTypes) {
      const std::size_t size = cki::dtype_size(dtype);
      if (header.size() > 1) header += ",";
      header += "\"t_" + std::string(cki::dtype_name(dtype)) + "\":{\"dtype\":\"" + cki::dtype_name(dtype) +
                "\",\"shape\":[1],\"data_offsets\":[" + std::to_string(data.size()) + "," +
                std::to_string(data.size() + size) + "]}";
      data += std::string(size, '\0');
    }
    header += "}";
    write_file(dir / "all.safetensors", safetensors_bytes(header, data));
    const cki::SafetensorsFile file(dir / "all.safetensors");
    REQUIRE(file.tensors().size() == std::size(cki::kAllDTypes));
    for (DType dtype : cki::kAllDTypes) {
      INFO(cki::dtype_name(dtype));
      REQUIRE(file.find(std::string("t_") + cki::dtype_name(dtype)) != nullptr);
      CHECK(file.find(std::string("t_") + cki::dtype_name(dtype))->dtype == dtype);
    }
  }
}

TEST_CASE("half and bfloat16 conversions round to nearest even", "[io][format]") {
  // Hand-derived encodings: 1 = 0x3C00 in F16 and 0x3F80 in BF16.
  const std::vector<float> values = {1.0f, -2.0f, 65504.0f, 65519.0f, 1.0f / 3.0f, 5.9604645e-08f};
  std::vector<std::uint8_t> bytes(values.size() * 2);
  REQUIRE_FALSE(cki::encode_values(values.data(), values.size(), DType::F16, bytes.data()));
  auto bits = [&](std::size_t i) { return static_cast<unsigned>(bytes[2 * i] | (bytes[2 * i + 1] << 8)); };
  CHECK(bits(0) == 0x3C00u);
  CHECK(bits(1) == 0xC000u);
  CHECK(bits(2) == 0x7BFFu);
  CHECK(bits(3) == 0x7BFFu);  // 65519 rounds down to 65504
  CHECK(bits(4) == 0x3555u);  // 1/3 = 0.333251953125 in F16
  CHECK(bits(5) == 0x0001u);  // smallest subnormal, 2^-24

  REQUIRE_FALSE(cki::encode_values(values.data(), values.size(), DType::BF16, bytes.data()));
  CHECK(bits(0) == 0x3F80u);
  CHECK(bits(1) == 0xC000u);
  CHECK(bits(4) == 0x3EABu);  // 0x3EAAAAAB rounds up

  const float tie = 1.0f + 1.0f / 256.0f;  // half-way between BF16 1 and 1 + 2^-7: ties to even, 1
  REQUIRE_FALSE(cki::encode_values(&tie, 1, DType::BF16, bytes.data()));
  CHECK(bits(0) == 0x3F80u);

  SECTION("values beyond the range overflow") {
    const std::vector<double> large = {1.0, 65520.0, -1e6};
    const auto overflow = cki::encode_values(large.data(), large.size(), DType::F16, bytes.data());
    REQUIRE(overflow);
    CHECK(*overflow == 1u);
    const double beyond_float = 1e39;
    CHECK(cki::encode_values(&beyond_float, 1, DType::F32, bytes.data()));
    const double infinite = std::numeric_limits<double>::infinity();
    CHECK_FALSE(cki::encode_values(&infinite, 1, DType::F16, bytes.data()));
  }
  SECTION("decoding inverts encoding") {
    std::vector<double> decoded(values.size());
    REQUIRE_FALSE(cki::encode_values(values.data(), values.size(), DType::F16, bytes.data()));
    cki::decode_values(DType::F16, bytes.data(), values.size(), decoded.data());
    CHECK(decoded[2] == 65504.0);
    CHECK(decoded[4] == 0.333251953125);
    CHECK(decoded[5] == std::ldexp(1.0, -24));
  }
}

TEMPLATE_TEST_CASE("files from the Python writer load with known values", "[io][python]", float, double) {
  if (!numpy_available()) {
    WARN("skipped: " << kPython << " has no numpy; install python3-numpy to run this test");
    return;
  }
  TempDir dir;
  const bool padded = GENERATE(true, false);
  INFO("header padded to 8 bytes: " << padded);
  const auto path = dir / "python.safetensors";
  REQUIRE(run_command(std::string(kPython) + " " + shell_quote(generator_script()) + " write " +
                      shell_quote(path.string()) + (padded ? "" : " --no-pad")) == 0);

  const auto set = cki::load_checkpoint<TestType>(path);
  CHECK(set.source() == path.string());
  CHECK(set.metadata().at("writer") == "gen_safetensors.py");
  CHECK(set.size() == 19);

  // Floating tensors: (i - 2) * 0.75 for i = 0..5, exact in every dtype.
  for (const char* name : {"f16", "bf16", "f32", "f64"}) {
    INFO("tensor " << name);
    const auto& view = set.view(name);
    REQUIRE(view.shape() == cki::Shape{2, 3});
    for (int i = 0; i < 6; ++i) CHECK(view[i] == static_cast<TestType>((i - 2) * 0.75));
  }
  CHECK(set.at("f16").dtype == DType::F16);
  CHECK(set.at("bf16").dtype == DType::BF16);

  const auto& f16 = set.view("f16_special");
  CHECK(f16[0] == 65504);
  CHECK(f16[1] == -65504);
  CHECK(f16[2] == static_cast<TestType>(std::ldexp(1.0, -24)));
  CHECK(f16[3] == 0);
  CHECK(std::signbit(f16[3]));
  CHECK(f16[4] == static_cast<TestType>(0.333251953125));
  CHECK(std::isinf(f16[5]));

  const auto& bf16 = set.view("bf16_special");
  CHECK(bf16[0] == static_cast<TestType>(0.333984375));
  CHECK(bf16[1] == static_cast<TestType>(3.3895313892515355e38));
  CHECK(bf16[2] == static_cast<TestType>(-std::ldexp(1.0, -133)));
  CHECK(bf16[3] == 1);
  CHECK(bf16[4] == static_cast<TestType>(1.015625));

  CHECK(set.view("scalar").shape().empty());
  CHECK(set.view("scalar")[0] == 7.5);
  CHECK(set.view("empty").size() == 0);

  // Integer, BOOL and F8 tensors: raw little-endian bytes.
  auto raw = [&](const char* name) { return *set.at(name).raw; };
  CHECK(raw("u8") == std::vector<std::uint8_t>{250, 251, 252, 253, 254, 255});
  CHECK(raw("bool") == std::vector<std::uint8_t>{1, 0, 1, 1, 0, 0});
  CHECK(raw("f8_e4m3") == std::vector<std::uint8_t>{0x00, 0x38, 0x40, 0x7E, 0x80, 0xB8});
  std::int16_t i16[6];
  std::memcpy(i16, raw("i16").data(), sizeof i16);
  CHECK(i16[0] == -32768);
  CHECK(i16[5] == 32767);
  std::uint64_t u64[6];
  std::memcpy(u64, raw("u64").data(), sizeof u64);
  CHECK(u64[5] == std::numeric_limits<std::uint64_t>::max());
  std::int64_t i64[6];
  std::memcpy(i64, raw("i64").data(), sizeof i64);
  CHECK(i64[0] == std::numeric_limits<std::int64_t>::min());
  CHECK(set.at("i64").dtype == DType::I64);
}

TEMPLATE_TEST_CASE("every dtype survives a round trip", "[io][format]", float, double) {
  TempDir dir;
  cki::WeightSet<TestType> set("in memory");
  set.metadata()["format"] = "pt";

  // Floating dtypes with values exact in each; other dtypes as byte patterns.
  for (DType dtype : cki::kAllDTypes) {
    const std::string name = std::string("t_") + cki::dtype_name(dtype);
    if (cki::is_spliceable(dtype)) {
      cki::Tensor<TestType> tensor(cki::Shape{2, 2});
      for (int i = 0; i < 4; ++i) tensor[i] = static_cast<TestType>(i * 1.5 - 2);
      set.add(name, std::move(tensor), dtype);
    } else {
      std::vector<std::uint8_t> bytes(4 * cki::dtype_size(dtype));
      for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::uint8_t>(37 * i + 11);
      set.add_raw(name, dtype, cki::Shape{4}, bytes);
    }
  }
  set.add("rank0", cki::Tensor<TestType>(cki::Shape{}, cki::Tensor<TestType>::Array::Constant(1, 3)));
  set.add("empty", cki::Tensor<TestType>(cki::Shape{3, 0}), DType::F16);

  const auto path = dir / "round.safetensors";
  cki::save_checkpoint(set, path);
  const auto loaded = cki::load_checkpoint<TestType>(path);
  require_same_tensors(loaded, set);
  CHECK(loaded.metadata() == set.metadata());

  SECTION("tensors stored as the compute scalar are views into one mapping") {
    const auto& first = loaded.at(std::string("t_") + cki::dtype_name(cki::dtype_of<TestType>()));
    const auto& second = loaded.at("rank0");
    REQUIRE(first.storage);
    CHECK(first.storage == second.storage);
    CHECK(loaded.at("t_F16").storage != first.storage);
  }
}

TEST_CASE("writer pads the header and aligns tensors", "[io][format]") {
  TempDir dir;
  cki::WeightSet<float> set;
  set.add("z_f64", cki::Tensor<float>(cki::Shape{3}), DType::F64);
  set.add("b_f16", cki::Tensor<float>(cki::Shape{3}), DType::F16);
  set.add("a_f32", cki::Tensor<float>(cki::Shape{1}), DType::F32);
  set.add_raw("c_u8", DType::U8, cki::Shape{1}, {7});
  cki::save_checkpoint(set, dir / "aligned.safetensors");

  const cki::SafetensorsFile file(dir / "aligned.safetensors");
  CHECK(file.data_start() % 8 == 0);
  const std::string header = read_file(dir / "aligned.safetensors").substr(8, file.data_start() - 8);
  CHECK(header[header.find_last_not_of(' ')] == '}');

  // Order: element size descending, then name.
  std::vector<std::string> order;
  for (const auto& info : file.tensors()) {
    order.push_back(info.name);
    CHECK(info.begin % cki::dtype_size(info.dtype) == 0);
  }
  CHECK(order == std::vector<std::string>{"z_f64", "a_f32", "b_f16", "c_u8"});
}

TEST_CASE("writer output reads back in the Python reader", "[io][python]") {
  if (!numpy_available()) {
    WARN("skipped: " << kPython << " has no numpy; install python3-numpy to run this test");
    return;
  }
  TempDir dir;
  cki::WeightSet<double> set;
  set.metadata()["note"] = "written by cki";
  cki::Tensor<double> values(cki::Shape{2, 2});
  values.array() << 0.5, -1.25, 1.0 / 3.0, 1e-3;
  set.add("w16", values, DType::F16);
  set.add("wbf", values, DType::BF16);
  set.add("w32", values, DType::F32);
  set.add("w64", values, DType::F64);
  set.add_raw("steps", DType::I64, cki::Shape{2}, {1, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF});
  const auto path = dir / "cki.safetensors";
  cki::save_checkpoint(set, path);

  const auto dump_path = dir / "dump.json";
  REQUIRE(run_command(std::string(kPython) + " " + shell_quote(generator_script()) + " dump " +
                      shell_quote(path.string()) + " --aligned > " + shell_quote(dump_path.string())) == 0);
  const auto dump = nlohmann::json::parse(read_file(dump_path));
  CHECK(dump["metadata"]["note"] == "written by cki");
  CHECK(dump["tensors"]["w64"]["values"] == nlohmann::json({0.5, -1.25, 1.0 / 3.0, 1e-3}));
  CHECK(dump["tensors"]["w32"]["values"][2] == static_cast<double>(1.0f / 3.0f));
  CHECK(dump["tensors"]["w16"]["values"][2] == 0.333251953125);
  CHECK(dump["tensors"]["wbf"]["values"][2] == 0.333984375);
  CHECK(dump["tensors"]["w16"]["shape"] == nlohmann::json({2, 2}));
  CHECK(dump["tensors"]["steps"]["values"] == nlohmann::json({1, -1}));
  CHECK(dump["tensors"]["steps"]["dtype"] == "I64");
}

TEST_CASE("out_dtype converts floating tensors only", "[io][format]") {
  TempDir dir;
  cki::WeightSet<float> set;
  cki::Tensor<float> values(cki::Shape{3});
  values.array() << 1.0f / 3.0f, 2.0f, -4.5f;
  set.add("w", values, DType::F32);
  set.add_raw("ids", DType::I32, cki::Shape{1}, {1, 2, 3, 4});
  cki::WriteOptions options;
  options.out_dtype = DType::BF16;
  cki::save_checkpoint(set, dir / "bf16.safetensors", options);

  const auto loaded = cki::load_checkpoint<float>(dir / "bf16.safetensors");
  CHECK(loaded.at("w").dtype == DType::BF16);
  CHECK(loaded.view("w")[0] == 0.333984375f);
  CHECK(loaded.view("w")[2] == -4.5f);
  CHECK(loaded.at("ids").dtype == DType::I32);

  options.out_dtype = DType::I8;
  const std::string message =
      error_message<std::invalid_argument>([&] { cki::save_checkpoint(set, dir / "bad.safetensors", options); });
  CHECK_THAT(message, Contains("'out_dtype' must be F16, BF16, F32 or F64, got I8"));
}

TEST_CASE("F16 overflow names tensor, value and file", "[io][format]") {
  TempDir dir;
  cki::WeightSet<float> set;
  set.add("fine", cki::Tensor<float>(cki::Shape{2}), DType::F16);
  cki::Tensor<float> big(cki::Shape{4});
  big.array() << 1.0f, 65519.0f, 70000.0f, 2.0f;
  set.add("big", big, DType::F16);
  const auto path = dir / "overflow.safetensors";

  const std::string message = error_message<cki::NumericError>([&] { cki::save_checkpoint(set, path); });
  CHECK_THAT(message, Contains("tensor 'big'"));
  CHECK_THAT(message, Contains("70000"));
  CHECK_THAT(message, Contains("at index 2"));
  CHECK_THAT(message, Contains("F16 (largest finite value 65504)"));
  CHECK_THAT(message, Contains(path.string()));

  // Nothing is left behind: no output, no temporary file.
  CHECK_FALSE(fs::exists(path));
  CHECK(fs::is_empty(dir.path()));
}

TEST_CASE("clamping saturates values beyond the dtype", "[io][format]") {
  const double infinity = std::numeric_limits<double>::infinity();
  const std::vector<double> values = {1.0, 65519.0, 65520.0, -1e6, infinity, 3e38, -1e39};
  std::vector<std::uint8_t> bytes(values.size() * 4);
  std::vector<double> decoded(values.size());

  SECTION("F16") {
    CHECK(cki::encode_values_saturated(values.data(), values.size(), DType::F16, bytes.data()) == 4);
    cki::decode_values(DType::F16, bytes.data(), values.size(), decoded.data());
    CHECK(decoded[0] == 1.0);
    CHECK(decoded[1] == 65504.0);  // rounds to the maximum, so it is not counted
    CHECK(decoded[2] == 65504.0);
    CHECK(decoded[3] == -65504.0);
    CHECK(decoded[4] == infinity);  // infinity is no overflow; it is written as it is
    CHECK(decoded[5] == 65504.0);
    CHECK(decoded[6] == -65504.0);
  }
  SECTION("F32") {
    CHECK(cki::encode_values_saturated(values.data(), values.size(), DType::F32, bytes.data()) == 1);
    cki::decode_values(DType::F32, bytes.data(), values.size(), decoded.data());
    CHECK(decoded[5] == static_cast<double>(3e38f));
    CHECK(decoded[6] == -static_cast<double>(std::numeric_limits<float>::max()));
  }
  SECTION("the writer counts clamped values") {
    TempDir dir;
    const auto path = dir / "clamped.safetensors";
    cki::SafetensorsWriter writer(path, {{"w", DType::BF16, {static_cast<std::int64_t>(values.size())}}}, {});
    cki::ValueChecks checks;
    checks.clamp = true;
    CHECK(writer.write("w", values.data(), values.size(), checks) == 1);  // only -1e39 exceeds BF16
    writer.commit();
    const auto set = cki::load_checkpoint<double>(path);
    CHECK(set.view("w")[6] == -cki::dtype_max(DType::BF16));
    CHECK(set.view("w")[4] == infinity);
  }
  SECTION("the writer rejects non-finite values when asked") {
    TempDir dir;
    const auto path = dir / "finite.safetensors";
    cki::SafetensorsWriter writer(path, {{"w", DType::F64, {static_cast<std::int64_t>(values.size())}}}, {});
    cki::ValueChecks checks;
    checks.allow_non_finite = false;
    const std::string message = error_message<cki::NumericError>([&] { writer.write("w", values.data(), values.size(), checks); });
    CHECK_THAT(message, Contains("tensor 'w' has the non-finite value inf at index 4"));
    CHECK_THAT(message, Contains(path.string()));
  }
}

TEST_CASE("outputs are atomic and never replace inputs", "[io][format]") {
  TempDir dir;
  const auto set = random_set<float>(1, {{"w", {4}}});
  const auto path = dir / "model.safetensors";
  cki::save_checkpoint(set, path);

  SECTION("an existing output needs overwrite") {
    const std::string message = error_message<cki::IoError>([&] { cki::save_checkpoint(set, path); });
    CHECK_THAT(message, Contains(path.string()));
    CHECK_THAT(message, Contains("already exists"));
    cki::WriteOptions options;
    options.overwrite = true;
    cki::save_checkpoint(random_set<float>(2, {{"w", {4}}}), path, options);
    CHECK(cki::load_checkpoint<float>(path).view("w")[0] == random_set<float>(2, {{"w", {4}}}).view("w")[0]);
  }
  SECTION("the loaded input itself, a hard link and a symbolic link are refused") {
    const auto loaded = cki::load_checkpoint<float>(path);
    cki::WriteOptions options;
    options.overwrite = true;
    CHECK_THAT(error_message<cki::IoError>([&] { cki::save_checkpoint(loaded, path, options); }),
               Contains("is the input"));
    fs::create_hard_link(path, dir / "hard.safetensors");
    fs::create_symlink(path, dir / "soft.safetensors");
    for (const char* alias : {"hard.safetensors", "soft.safetensors"}) {
      INFO(alias);
      CHECK_THAT(error_message<cki::IoError>([&] { cki::save_checkpoint(loaded, dir / alias, options); }),
                 Contains("is the input"));
    }
  }
  SECTION("a folder that contains an input is refused") {
    cki::WriteOptions options;
    options.overwrite = true;
    CHECK_THAT(error_message<cki::IoError>([&] { cki::save_checkpoint(set, dir.path(), options, {path}); }),
               Contains("contains the input"));
  }
  SECTION("a folder without a checkpoint is not replaced") {
    fs::create_directory(dir / "notes");
    write_file(dir / "notes" / "todo.txt", "keep me");
    cki::WriteOptions options;
    options.overwrite = true;
    CHECK_THAT(error_message<cki::IoError>([&] { cki::save_checkpoint(set, dir / "notes", options); }),
               Contains("contains no safetensors checkpoint"));
    CHECK(fs::exists(dir / "notes" / "todo.txt"));
  }
  SECTION("a missing output folder is an I/O error") {
    CHECK_THAT(error_message<cki::IoError>([&] { cki::save_checkpoint(set, dir / "no" / "such.safetensors"); }),
               Contains("cannot create a temporary file"));
  }
}
