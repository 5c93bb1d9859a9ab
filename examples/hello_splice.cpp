// Splices three small models held in Eigen arrays and prints the merge report.
#include <iostream>

#include <cki/cki.hpp>

int main() {
  std::vector<cki::WeightSet<float>> models;
  for (int seed = 0; seed < 3; ++seed) {
    cki::WeightSet<float> model("model " + std::to_string(seed + 1));
    cki::Tensor<float> weight({4, 3});
    weight.array() = Eigen::ArrayXf::LinSpaced(12, -1.0f, 1.0f) * (1.0f + 0.1f * seed);
    weight[seed] += 0.5f;  // each model disagrees with the others at one element
    model.add("fc.weight", std::move(weight));
    model.add("fc.bias", cki::Tensor<float>({4}));
    models.push_back(std::move(model));
  }

  cki::CkiParams params;  // softmax rule, a = 0.4, c = 500, 10 bins
  cki::SpliceOptions options;
  options.include = {"*.weight"};
  const auto result = cki::splice(models, cki::CkiSoft<float>(params), options);

  std::cout << "merged fc.weight: " << result.merged.view("fc.weight").array().transpose() << "\n";
  std::cout << result.report.to_json().dump(2) << "\n";
  return 0;
}
